"""The ``nextstep train-rl`` recipe: ``RLConfig``, read from JSON like every recipe (``configs/shapes-rl.json``).

Every field is checked in ``__post_init__`` with an error that names it; an unknown key in a recipe file is an error.
``run.batch_size`` is the number of PROMPTS of a step (all processes together), each rolled out ``group`` times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import _check
from ..data.shapes import CATEGORIES, EDIT_TYPES, data_weights
from ..errors import ConfigError, SettingError
from ..settings import _is_number, check
from ..train.config import RUN_MAY_CHANGE, OptimConfig, RunConfig, _coerce
from .grpo import ADVANTAGE_EPS
from .policy import PARAMETER_SETS
from .rewards import BUILTIN_REWARDS
from .rollout import check_policy

RL_KINDS = ("t2i", "edit")
ROLLOUT_NAMES = {"num_inference_steps": "steps"}  # the recipe's names of the settings it spells otherwise
ROLLOUT_OPTIONAL = ("guidance_scale", "image_guidance_scale", "time_shift")  # null: the model's default


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class RolloutConfig:
    """How rollouts are sampled: a sampler whose steps are Gaussian transitions (the policy's log-probabilities are
    exact), its steps and noise level, guidance and shift (None: the model's own default for text-to-image or
    editing), and the image side in pixels."""

    sampler: str = "flow_sde"  # "flow_sde" or "cps"
    steps: int = 10  # head steps per image token
    noise_level: float = 0.8  # in (0, 1]: the sampler's noise (0 would make every step deterministic)
    guidance_scale: float | None = None
    image_guidance_scale: float | None = None  # edits only
    time_shift: float | None = None
    image_size: int = 64
    # the images of a prompt share each token's start and context noise: they differ only by the head steps' noise,
    # the actions GRPO credits (noise the policy cannot account for otherwise blurs the advantages)
    group_noise: bool = False
    # prompts per pipeline call: part of a run's identity (batched rows round differently), and each process's share
    # of a step's prompts must be a multiple of it, so that every call, and so every sample, is the same whatever the
    # number of processes
    batch: int = 1

    def __post_init__(self) -> None:
        settings = self.settings()
        try:  # the settings' own bounds, then what rollouts need of them
            check({k: v for k, v in settings.items() if v is not None or k not in ROLLOUT_OPTIONAL})
            check_policy(settings)
        except SettingError as e:
            raise ConfigError(f"rollout.{ROLLOUT_NAMES.get(e.field, e.field)} {e.problem}") from None
        _check(_integer(self.image_size) and self.image_size > 0 and self.image_size % 16 == 0,
               f"rollout.image_size must be a positive multiple of 16, got {self.image_size!r}")
        _check(_integer(self.batch) and self.batch >= 1, f"rollout.batch must be an integer >= 1, got {self.batch!r}")
        _check(isinstance(self.group_noise, bool), f"rollout.group_noise must be true or false, got "
                                                   f"{self.group_noise!r}")

    def settings(self) -> dict[str, Any]:
        """The pipeline's sampling overrides (None keeps the model's default)."""
        return dict(sampler=self.sampler, num_inference_steps=self.steps, noise_level=self.noise_level,
                    guidance_scale=self.guidance_scale, image_guidance_scale=self.image_guidance_scale,
                    time_shift=self.time_shift)


@dataclass
class RLConfig:
    """``nextstep train-rl``: GRPO post-training of a model on its own samples (``nextstep.rl``).

    Each step draws ``run.batch_size`` prompts of the shapes world (all text-to-image or all edits, the kind drawn
    per step by ``mix``; categories and edit types by ``weights``) from a random stream of the run's seed that the
    evaluation sets never use, samples ``group`` images of each with the current policy (``rollout``), scores them
    (``reward``: "shapes", "shapes_graded" or a user's "module:function"), normalises the rewards within each group
    (``advantage_eps`` added to its std), and makes ``updates`` optimizer steps on the clipped-ratio loss (``clip``)
    over ``pairs`` random (token, head step) pairs of every image (null: all of them) plus ``kl_weight`` times the
    exact KL to the frozen starting model. Only the ``parameters`` set is trained ("head", "head+last_layers" with
    ``last_layers``, or "all")."""

    MAY_CHANGE_ON_RESUME: ClassVar[tuple[str, ...]] = (*RUN_MAY_CHANGE, "sample_prompts")
    run: RunConfig = field(default_factory=lambda: RunConfig(steps=300, batch_size=8, log_every=1, ckpt_every=25))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0,
                                                                   warmup_steps=10, min_lr_ratio=1.0))
    model: str | None = None  # the model directory to post-train (default: the bundled model)
    vae: str | None = None  # default: the model's vae/
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    group: int = 4  # images per prompt (GRPO's group)
    mix: dict[str, float] = field(default_factory=lambda: {"t2i": 0.6, "edit": 0.4})
    weights: dict[str, float] = field(default_factory=dict)  # {category or edit type: weight}, names left out: 1
    reward: str = "shapes_graded"
    parameters: str = "head"
    last_layers: int = 1  # backbone layers trained with parameters "head+last_layers"
    clip: float = 0.2  # the importance ratio's clip half-width
    kl_weight: float = 0.01
    # added to each group's reward std before dividing by it: GRPO's 1e-4 turns a group whose rewards differ by
    # rounding-level amounts (a PSNR term) into full +-1 advantages; 0.1 leaves such groups near 0
    advantage_eps: float = ADVANTAGE_EPS
    updates: int = 2  # optimizer steps per rollout batch (the later ones off-policy, through the ratio)
    pairs: int | None = None  # (token, step) pairs per image in each update's loss; null: every stochastic pair
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle", "two blue squares",
                                                               "a green triangle to the left of a yellow square",
                                                               "a purple circle and an orange triangle"])

    def __post_init__(self) -> None:
        _coerce(self, "run", RunConfig)
        _coerce(self, "optim", OptimConfig)
        _coerce(self, "rollout", RolloutConfig)
        _check(not self.run.compile, "run.compile is not supported by train-rl (rollouts and updates change shapes "
                                     "every step): set it to false")
        _check(self.run.batch_size % self.rollout.batch == 0,
               f"run.batch_size ({self.run.batch_size} prompts per step) must be a multiple of rollout.batch "
               f"({self.rollout.batch} prompts per pipeline call)")
        _check(_integer(self.group) and self.group >= 2,
               f"group must be an integer >= 2 (advantages compare the images of a prompt), got {self.group!r}")
        _check(isinstance(self.mix, dict) and set(self.mix) <= set(RL_KINDS),
               f"mix keys must be among {RL_KINDS}, got {self.mix!r}")
        _check(all(_is_number(v) and v >= 0 for v in self.mix.values()) and sum(self.mix.values()) > 0,
               f"mix weights must be numbers >= 0, not all zero, got {self.mix}")
        _check(isinstance(self.weights, dict), f"weights must be an object, got {self.weights!r}")
        try:  # canonical: weights that draw the same prompts compare equal on resume
            self.weights = data_weights(self.weights)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _check(isinstance(self.reward, str) and (self.reward in BUILTIN_REWARDS or _module_function(self.reward)),
               f"reward must be a built-in {sorted(BUILTIN_REWARDS)} or 'module:function' (a Python callable "
               f"function(images, prompts, sources) -> scores), got {self.reward!r}")
        _check(self.parameters in PARAMETER_SETS,
               f"parameters must be one of {PARAMETER_SETS}, got {self.parameters!r}")
        _check(_integer(self.last_layers) and self.last_layers >= 1,
               f"last_layers must be an integer >= 1, got {self.last_layers!r}")
        _check(_is_number(self.clip) and 0 < self.clip < 1, f"clip must be a number in (0, 1), got {self.clip!r}")
        _check(_is_number(self.kl_weight) and self.kl_weight >= 0,
               f"kl_weight must be a number >= 0, got {self.kl_weight!r}")
        _check(_is_number(self.advantage_eps) and self.advantage_eps > 0,
               f"advantage_eps must be a number > 0, got {self.advantage_eps!r}")
        _check(_integer(self.updates) and self.updates >= 1, f"updates must be an integer >= 1, got {self.updates!r}")
        _check(self.pairs is None or _integer(self.pairs) and self.pairs >= 1,
               f"pairs must be null (every pair) or an integer >= 1, got {self.pairs!r}")
        _check(isinstance(self.sample_prompts, list) and all(isinstance(p, str) and p for p in self.sample_prompts),
               f"sample_prompts must be a list of non-empty strings, got {self.sample_prompts!r}")
        _check(not self.run.sample_every or bool(self.sample_prompts), "run.sample_every needs sample_prompts")

    @property
    def kind_weights(self) -> tuple[float, float]:
        """(text-to-image, edit) probabilities of a step's kind."""
        t2i, edit = (float(self.mix.get(k, 0.0)) for k in RL_KINDS)
        return t2i / (t2i + edit), edit / (t2i + edit)

    def draw_probabilities(self, edit: bool) -> list[float]:
        """Probabilities over ``EDIT_TYPES`` (``edit``) or ``CATEGORIES`` from ``weights``."""
        names = EDIT_TYPES if edit else CATEGORIES
        w = [self.weights.get(n, 1.0) for n in names]
        return [v / sum(w) for v in w]


def _module_function(name: str) -> bool:
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr)
