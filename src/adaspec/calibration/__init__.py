"""Calibration: measure a target/drafter pair, fit its profile, and name the models it fits.

- `fit`: run the pair with a generous fixed draft, log every judged draft token, fit the acceptance
  model, lambdas, the entropy threshold and skip_entropy (`calibrate`);
- `cost`: the measured cost model, what a target forward over n new tokens costs on this machine;
- `profile`: the fitted knobs and models of one pair as JSON, refused for another pair;
- `identity`: what identifies a model, a machine and the software versions (profiles and bench runs);
- `regimes`: the plot of one generation's entropy regimes, drafters and draft lengths;
- `cli`: `adaspec calibrate` and `adaspec trace`.
"""
