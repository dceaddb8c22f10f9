"""The GPU campaign: three one-command calls that turn a rare 30-minute GPU lease into committed numbers.

=============  ===========================================================================  =======
call           what it measures                                                             limit
=============  ===========================================================================  =======
``check``      environment; cuBLAS bf16 rates (8192^3 and the three Gemma-2-9B head GEMMs);  540 s
               bf16 exactness of every backend and schedule against a float64 reference
               computed on the GPU in chunks; kernel-variant microbenchmarks; a
               configuration sweep whose winners form ``simpo_kernels/tuned/<gpu>.json``
``bench``      the loss runner at the 9B head (N = 2048 ... 65536), a realistic batch,      540 s
               the 2B and Llama-3-8B heads as time allows, against Liger-Kernel and CCE
``train-step`` one training step of a Gemma-2-2B-shaped model, official logits path against  540 s
               ours, and the largest per-device batch each fits; optionally an ``ncu`` capture
=============  ===========================================================================  =======

    bash benchmarks/campaign/run.sh <call> [options]          # on the GPU machine (installs .whl/)
    python -m benchmarks.campaign <call> --dry-run --out DIR  # every code path on CPU, tiny shapes

Every call writes ``<call>.json`` under ``--out`` after each step (a call cut off keeps what it
finished), stops starting work ``--margin-s`` (60 s) before ``--limit-s``, interrupts a step still
running at that point, and prints a short table last. :mod:`.common` holds that machinery.
"""
