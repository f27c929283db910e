"""The shipped method families, one per file; `model._target_` names one (or a researcher's own class).

- `avsbench.AVSBenchSegmentor`: the AVSBench baseline (TPAVI), one branch.
- `avsbg.AVSBGSegmentor`: AVS-BG (bidirectional generation), one branch + the visual-to-audio projector.
- `ecmvae.ECMVAESegmentor`: ECMVAE, prior/posterior branches around a latent part; with a projector
  configured it is the ECMVAE + AVS-BG combination (configs/model/ecmvae_bg.yaml).
"""
