"""Runtime: run a compiled megakernel artifact on a GPU, token-exact against PyTorch.

    launch.py   load kernel.<arch>.cubin (CuPy), pack `Params`, cooperative launch through the
                driver API (`cuLaunchCooperativeKernel`), every CUresult checked; and a CPU
                stand-in that runs the schedule through the interpreter (tests without a GPU)
    weights.py  a `Reference` in bf16 filled from an HF checkpoint or seeded synthetic weights
    session.py  `Session`: weights, KV cache, counters and buffers of one artifact; prefill
                through the PyTorch reference, then `decode(n)` on the kernel
    bench.py    batch-1 decode latency and batch-16 throughput, side by side with torch eager
                and `torch.compile(mode="reduce-overhead")` in the same process
    check.py    greedy tokens against the bf16 reference, logits against a float32 one
    smoke.py    the script run on the lent GPU (`python -m compiler.runtime.smoke ...`)
    errors.py   RuntimeUnavailable, LaunchError (importable without torch or CuPy)
    NOTES.md    each kernel version's prediction and measurement, with the card

Nothing here is imported by the compile pipeline: CuPy and a GPU are needed only when a
`Session` is opened on a CUDA device.
"""
