"""Speed benchmarks shipped with the package, so that an installed adaskip can measure itself:
`adaskip bench kernels` (adaskip.ops against the copy-bandwidth ceiling) and `adaskip bench e2e`
(the runtime, every skipping strategy, the ideal speedup and HF transformers on the same weights).

Modules: common (device, driver, commit, date, JSON), kernels, models (random-weight configs and
the transformers twin), e2e (arguments, setup, the run), measure (what is timed and how, the
ideal speedup, result rows), report (tables, plot), cli (`register`).
"""


from .cli import register

__all__ = ["register"]
