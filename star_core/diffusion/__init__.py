"""Diffusion side of STAR: schedule, DPM++(2M) SDE sampler, Brownian noise, CFG rescale, temporal chunking."""
from .chunking import DEFAULT_FUSION, FUSIONS, plan_chunks
from .noise import BrownianTreeNoiseSampler, InjectedNoiseSampler
from .sampler import sample_dpmpp_2m_sde
from .schedule import alphas_vp, c_in, discretized_timesteps, k_sigmas, sigma_to_t, sigmas_vp, t_max_for_denoise
from .star_sampling import SamplerSettings, StarDenoiser, sample_star

__all__ = [
    "DEFAULT_FUSION", "FUSIONS", "plan_chunks", "BrownianTreeNoiseSampler", "InjectedNoiseSampler",
    "sample_dpmpp_2m_sde", "alphas_vp", "c_in", "discretized_timesteps", "k_sigmas", "sigma_to_t", "sigmas_vp",
    "t_max_for_denoise", "SamplerSettings", "StarDenoiser", "sample_star",
]
