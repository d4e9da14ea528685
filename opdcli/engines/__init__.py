"""Rollout and scoring engines behind two interfaces (`types.Sampler`, `types.Scorer`), with the
transformers implementations `hf_sampler.HFSampler` and `hf_scorer.HFScorer`."""
