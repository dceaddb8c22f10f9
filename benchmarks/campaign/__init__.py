"""The GPU campaign: one prepared command that turns a rare 15-minute GPU lease into committed numbers.

A lent GPU comes with 15 minutes of device time in all (the machine's start of 1-2 minutes, every
call, idle time), one call at most 10 minutes. The campaign is one call of at most 540 s, its steps
ordered most decisive first so that a call cut anywhere keeps the most:

=========  ==========================================================================================
group      what (:mod:`.steps`)
=========  ==========================================================================================
env        environment, cuBLAS bf16 rates (8192^3: the floor's rate; the 9B head's GEMMs)
exact      bf16 exactness of every backend and schedule against float64, small and 9B shapes;
           ``pytest tests/test_triton_cuda.py`` beside it; never cut by a prediction
head       the 9B head at N=8192 (all positions targets; the UltraFeedback-like batch): our
           schedules, eager, Liger, CCE with and without filtering, ``F.linear_cross_entropy``
memory     the 9B head at N=32768 and 65536
train      one Gemma-2-2B-shaped training step, official logits path against ours
sweep      with time left: kernel options per schedule -> ``tuned-<gpu>.json``
=========  ==========================================================================================

    SIMPO_COMMIT=<sha> bash benchmarks/campaign/run.sh          # on the GPU machine
    OUT=/tmp/x bash benchmarks/campaign/run.sh --dry-run          # every code path on CPU, tiny shapes
    python -m benchmarks.campaign --plan                          # each step's predicted seconds

The call writes ``campaign.json`` and ``campaign.tar.gz`` (everything) under ``$OUT`` after every
step (:mod:`.common`); :mod:`.plan` holds the shapes, the predictions and the fixed costs that a GPU
run calibrates (``--calibrate``).
"""
