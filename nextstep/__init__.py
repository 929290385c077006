"""nextstep: NextStep-1 (autoregressive image generation with continuous tokens) in plain PyTorch."""

from .config import FlowHeadConfig, NextStepConfig, TransformerConfig, VAEConfig, preset
from .errors import ConfigError
from .model.nextstep import NextStep
from .model.vae import VAE
from .pipeline import NextStepPipeline, PipelineOutput
from .tokenizer import Tokenizer

__all__ = ["ConfigError", "FlowHeadConfig", "NextStep", "NextStepConfig", "NextStepPipeline", "PipelineOutput",
           "Tokenizer", "TransformerConfig", "VAE", "VAEConfig", "preset"]
__version__ = "0.1.0"
