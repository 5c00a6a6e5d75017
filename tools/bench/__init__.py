"""`python -m tools.bench`: side-by-side benchmarks against peers, recorded as JSON under bench/results/.

Subcommands: kernels (linear GEMM/GEMV), e2e (decoder tokens/s), embed (sentences/s), plot (PNG charts),
readme (the README performance section). See tools/bench/__main__.py for the options.
"""
