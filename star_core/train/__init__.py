"""Fine-tuning STAR: the official training step with the Dynamic Frequency loss, data, and the ``train`` command."""
from .loss import DFTerms, FrequencyParts, df_loss, frequency_parts, magnitude_cutoff, percentile, predicted_x0, v_target
from .network import DROPOUT_MODES, TRAINABLE_SETS, prepare_for_training, set_checkpointing, set_dropout, trainable_names
from .step import StepResult, StepSettings, decode_latent, encode_clips, sample_timesteps, step_loss

__all__ = [
    "DFTerms", "FrequencyParts", "df_loss", "frequency_parts", "magnitude_cutoff", "percentile", "predicted_x0",
    "v_target", "DROPOUT_MODES", "TRAINABLE_SETS", "prepare_for_training", "set_checkpointing", "set_dropout",
    "trainable_names", "StepResult", "StepSettings", "decode_latent", "encode_clips", "sample_timesteps",
    "step_loss",
]
