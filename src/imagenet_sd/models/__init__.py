"""The models the pipeline runs: Stable Diffusion, the rehearsal stand-in, CLIP, and the embedded tiny random-weight models."""
