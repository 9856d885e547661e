"""datalever: the training-data distribution as a lever on LLM fine-tuning.

Stages, one module each, data flowing one way through files in a run directory:
examples -> profile (proxy + loss trajectories) -> split (easy/hard) -> upsample -> train -> evaluate;
`experiment` composes them over arms and seeds; `theory` stands apart.
"""

__version__ = "0.1.0"
