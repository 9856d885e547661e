"""Running a study's units where and when: on this process, on N local worker processes, or as SLURM jobs.

    units.py    a unit (name, what it reads, how to tell it is finished, how to run it) and its claim
    driver.py   the loop: ready units started as the launcher has room, progress, failures reported at the end
    local.py    launchers on this machine: in this process (the default) or N worker processes
    worker.py   one unit in a process of its own (a local worker, or a SLURM job)
    slurm.py    the SLURM launcher, through submitit

What to run is the study's (`experiment.units`); this package never looks inside a unit.
"""
