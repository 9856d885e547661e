"""The paper's recipes (configs/paper/*.yaml): each parses and validates as the CLI reads it, holds the paper's
hyperparameters and names models of the right families; and (slow) each runs end to end with its models swapped for
the tiny preset of the same family and its hub data for a few local rows of the same formats, everything else kept
(optimizer, LoRA, SAM, arms, K, k, m, the test sets, chat_template)."""

import dataclasses
import json
from pathlib import Path

import pytest

from datalever import experiment, provenance, rundir
from datalever.cli import read_config
from datalever.examples import load_examples
from datalever.models import PRESETS
from datalever.rundir import RunDir
from datalever.split import SplitConfig

RECIPES = Path(__file__).parents[1] / "configs" / "paper"
NAMES = ["baseline", "llama3.2-1b", "gemma3-1b", "phi2", "muon", "lora", "sam"]

# Hub id -> family (the model's HF model_type), and family -> the tiny preset of that architecture.
FAMILIES = {
    "EleutherAI/pythia-70m": "gpt_neox",
    "Qwen/Qwen3-0.6B-Base": "qwen3",
    "meta-llama/Llama-3.2-1B": "llama",
    "google/gemma-3-1b-pt": "gemma3_text",
    "microsoft/phi-2": "phi",
}
TINY = {"gpt_neox": "preset:tiny-neox", "qwen3": "preset:tiny-qwen3", "llama": "preset:tiny"}
TINY |= {"gemma3_text": "preset:tiny-gemma3", "phi": "preset:tiny-phi"}
TARGETS = {"llama3.2-1b": "meta-llama/Llama-3.2-1B", "gemma3-1b": "google/gemma-3-1b-pt", "phi2": "microsoft/phi-2"}
OPTIMIZERS = {"muon": "muon"}  # each recipe's optimizer (an arm may override it: sam)


def load(name):
    return read_config(experiment.ExperimentConfig, RECIPES / f"{name}.yaml")


def test_every_recipe_is_tested():
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_holds_the_papers_settings(name):
    cfg = load(name)  # read as --config reads it; every stage's config has checked its options
    p, t = cfg.profile, cfg.train
    # Proxy (paper: Pythia-70M, 1/3 epoch; summary: K=5; prototype: AdamW lr 2e-5, batch 32, warmup 3% of a 3-epoch
    # cosine schedule, length 512).
    assert p.proxy == "EleutherAI/pythia-70m"
    assert (p.fraction, p.checkpoints, p.schedule_epochs) == (1 / 3, 5, 3.0)
    assert (p.optim.name, p.optim.lr, p.batch_size, p.warmup_ratio, p.max_length) == ("adamw", 2e-5, 32, 0.03, 512)
    # Split and upsampling: trajectory features, k=2 (the split stage's k: the experiment has no option for it),
    # within each source, hard examples used twice.
    assert (cfg.features, cfg.stratify, cfg.m, SplitConfig.k, cfg.hard_by) == ("trajectory", True, 1, 2, "loss")
    # The prototype's small sources: below the mean source size (or 78 rows), upsampled whole without clustering.
    assert (cfg.small_sources, cfg.small_source_rule, cfg.min_source_size) == ("upsample", "mean", 78)
    # The prototype's prompt (Stanford Alpaca's preamble, nothing after "### Response:"), for training and test, its
    # 5% validation hold-out (seed 42) and its 300 new tokens.
    preamble = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    )
    assert cfg.template == preamble + "\n\n### Instruction:\n{instruction}\n\n### Response:"
    assert cfg.test_templates == {
        "gsm8k": preamble + "\n\n### Instruction:\n{question}\n\n### Response:",
        "math": preamble + "\n\n### Instruction:\n{problem}\n\n### Response:",
    }
    assert (cfg.val_holdout, cfg.val_holdout_seed, cfg.eval_max_new_tokens) == (0.05, 42, 300)
    # Target (prototype: lr 2e-5, batch 32, 3 epochs, length 512, warmup 0.03 then cosine to 0, clip 1.0, wd 0).
    assert (t.optim.lr, t.batch_size, t.epochs, t.max_length) == (2e-5, 32, 3, 512)
    assert (t.warmup_ratio, t.min_lr_ratio) == (0.03, 0)
    assert (t.max_grad_norm, t.optim.weight_decay, t.dtype, t.mixed_precision) == (1.0, 0.0, "float32", "auto")
    assert t.optim.name == OPTIMIZERS.get(name, "adamw")
    assert t.model == TARGETS.get(name, "Qwen/Qwen3-0.6B-Base")
    # Base models: plain prompts for the proxy, the target and (through train.chat_template) evaluation.
    assert p.chat_template == t.chat_template == "none"
    assert (cfg.train_file, cfg.schema) == ("TIGER-Lab/MathInstruct", "alpaca")
    assert cfg.test_files == {"gsm8k": "openai/gsm8k:main", "math": "HuggingFaceH4/MATH-500"}
    assert cfg.eval_split == "test" and cfg.run_dir == f"runs/paper/{name}"
    assert {"base", "hard"} <= set(cfg.arms) and len(cfg.seeds) == 3
    # Each model id names a known family, whose tiny preset the end-to-end test runs.
    for model in (p.proxy, t.model):
        assert PRESETS[TINY[FAMILIES[model]].removeprefix("preset:")].arch == FAMILIES[model]


def test_the_variants_differ_from_the_baseline_only_where_they_say():
    base = provenance.flatten(rundir.to_jsonable(load("baseline")))
    expected = {
        "llama3.2-1b": {"train.model"},
        "gemma3-1b": {"train.model"},
        "phi2": {"train.model", "train.micro_batch_size"},
        "muon": {"train.optim.name"},
        "lora": {"train.lora.enabled", "train.lora.target_modules"},
        "sam": set(),
    }
    for name, keys in expected.items():
        other = provenance.flatten(rundir.to_jsonable(load(name)))
        differ = {k for k in base.keys() | other.keys() if base.get(k) != other.get(k)}
        assert differ - {"run_dir", "arms"} == keys, name


def test_lora_and_sam_settings():
    lora = load("lora").train.lora  # prototype: r 8, alpha 16, dropout 0.05 on the q and v projections
    assert (lora.enabled, lora.r, lora.alpha, lora.dropout) == (True, 8, 16, 0.05)
    assert lora.target_modules == ["q_proj", "v_proj"]
    sam = load("sam")  # prototype: rho 0.05-0.1 around AdamW; the sam arm trains the original data with it
    assert (sam.train.optim.sam_rho, sam.train.optim.sam_base) == (0.05, "adamw")
    assert "sam" in sam.arms and experiment.config.arm_spec(sam, "sam").optimizer == "sam"
    muon = load("muon").train.optim  # one lr for both halves: Muon's update RMS is matched to AdamW's
    assert (muon.muon_lr, muon.muon_adjust_lr, muon.muon_momentum) == (None, "match_rms_adamw", 0.95)


# ----------------------------------------------------------------------------- end to end, on tiny stand-ins


def write_local_data(root: Path) -> dict[str, str]:
    """A few rows in each hub dataset's format: MathInstruct (Alpaca: a source of 100 rows, clustered on its own, and
    one of 12, below the mean source size and 78 rows, which the prototype's rule upsamples whole), GSM8K (`#### N`)
    and MATH-500 (problem/solution with \\boxed{N}, answer, subject, level)."""
    train = []
    for i in range(100):
        a, b = i + 2, 3 * i + 1
        train.append(
            {
                "source": "data/CoT/gsm_rft.json",
                "instruction": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                "output": f"Tom has {a} + {b} = {a + b} apples. The answer is {a + b}.",
            }
        )
    for i in range(12):
        a, b = i + 2, 3 * i + 1
        train.append(
            {
                "source": "data/CoT/MATH_train.json",
                "instruction": f"What is ${a} \\times {b}$?",
                "output": f"${a} \\times {b} = {a * b}$. The answer is {a * b}.",
            }
        )
    gsm8k = [
        {
            "question": f"Ann reads {n} pages a day for 3 days. How many pages does she read?",
            "answer": f"{n}*3={3 * n}\n#### {3 * n}",
        }
        for n in range(5, 11)
    ]
    math = [
        {
            "problem": f"Compute ${n}^2$.",
            "solution": f"${n}^2 = {n * n}$, so the answer is $\\boxed{{{n * n}}}$.",
            "answer": str(n * n),
            "subject": "Algebra",
            "level": 1 + n % 5,
            "unique_id": f"test/algebra/{n}.json",
        }
        for n in range(11, 17)
    ]
    files = {}
    for name, rows in [("mathinstruct", train), ("gsm8k", gsm8k), ("math500", math)]:
        files[name] = str(root / f"{name}.jsonl")
        Path(files[name]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def local_stand_in(hub_name: str, files: dict) -> str:
    return files["gsm8k" if "gsm8k" in hub_name else "math500" if "MATH" in hub_name else "mathinstruct"]


def shrink(cfg, run_dir: Path, files: dict):
    """The recipe with tiny models, local rows and seconds of work; everything that defines it kept."""
    profile = dataclasses.replace(
        cfg.profile,
        proxy=TINY[FAMILIES[cfg.profile.proxy]],
        batch_size=4,  # 106 rows (95% of 112) x 1/3 epoch = 9 proxy steps: room for K=5 recorded steps
        micro_batch_size=4,
        token_budget=None,
    )
    train = dataclasses.replace(
        cfg.train, model=TINY[FAMILIES[cfg.train.model]], epochs=1, batch_size=8, micro_batch_size=8, save_every=0
    )
    return dataclasses.replace(
        cfg,
        run_dir=str(run_dir),
        train_file=local_stand_in(cfg.train_file, files),
        test_files={name: local_stand_in(path, files) for name, path in cfg.test_files.items()},
        profile=profile,
        train=train,
        seeds=cfg.seeds[:1],
        eval_limit=3,
        eval_max_new_tokens=6,
        eval_batch_size=3,
        progress=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_recipe_runs_end_to_end_on_tiny_stand_ins(name, tmp_path):
    recipe = load(name)
    cfg = shrink(recipe, tmp_path / "run", write_local_data(tmp_path))
    experiment.run(cfg)
    run = RunDir(cfg.run_dir)
    results = json.loads(run.results_json.read_text())
    tests = list(recipe.test_files)
    # A column per test set, every arm and seed finished on each.
    assert results["benchmarks"] == tests == ["gsm8k", "math"]
    header = run.results_md.read_text().split("\n| arm |")[1].splitlines()[0]
    assert all(f"{t} acc %" in header for t in tests), header
    assert set(results["arms"]) == set(recipe.arms)
    # The test sets are asked in the training data's prompt, the prototype's: Alpaca's preamble, then the question.
    for t in ["train", "validation", *(f"test-{t}" for t in tests)]:
        prompts = [ex.prompt for ex in load_examples(str(run.data_file(t)))]
        assert all(p.startswith("Below is an instruction") and p.endswith("\n\n### Response:") for p in prompts), t
    # 5% of the training rows held out for validation; the small source upsampled whole, the large one clustered.
    assert len(load_examples(str(run.data_file("validation")))) == 112 - int(112 * 0.95)
    summary = rundir.read_json(run.split().summary)
    assert summary["small_sources"] == ["data/CoT/MATH_train.json"]
    assert summary["small_source_rule"]["n_upsampled"] == sum(
        1 for ex in load_examples(str(run.data_file("train"))) if ex.source == "data/CoT/MATH_train.json"
    )
    for arm in recipe.arms:
        assert set(results["arms"][arm]["benchmarks"]) == set(tests)
        for seed in cfg.seeds:
            d = run.seed_dir(arm, seed)
            for t in tests:
                assert rundir.read_json(d.eval_on(t).metrics)["n"] == cfg.eval_limit
            # The recipe's optimizer (or the arm's own: sam), LoRA and plain prompts were what trained.
            recorded = provenance.recorded_settings(d.train.root, "train")
            optimizer = experiment.config.arm_spec(recipe, arm).optimizer or recipe.train.optim.name
            want = dataclasses.replace(recipe.train.optim, name=optimizer)
            assert recorded["optim"] == rundir.to_jsonable(want), arm
            assert recorded["lora"] == dataclasses.asdict(recipe.train.lora)
            assert recorded["chat_template"] == "none" and recorded["model"] == cfg.train.model
            model_type = rundir.read_json(d.train.model / "config.json")["model_type"]
            assert model_type == FAMILIES[recipe.train.model]
            summary = rundir.read_json(d.train.summary)
            assert (summary["optimizer"], summary["lora"]) == (optimizer, recipe.train.lora.enabled)
            assert (summary["trainable_params"] < summary["n_params"]) == recipe.train.lora.enabled
    # The proxy (of Pythia's family) trained 1/3 epoch and recorded K steps; the split used k=2 within sources.
    meta = rundir.read_json(run.trajectories_meta)
    assert meta["proxy"]["model_type"] == FAMILIES[recipe.profile.proxy]
    assert (meta["config"]["fraction"], len(meta["steps"])) == (recipe.profile.fraction, recipe.profile.checkpoints)
    split = provenance.recorded_settings(run.root, "split")
    assert (split["k"], split["stratify"], split["features"]) == (2, True, recipe.features)
