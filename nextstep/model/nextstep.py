"""The joint model: text + image-token embeddings, the Qwen2 backbone, the LM head and the flow head.

Data flow (training and sampling share every step):
    ids + image latents --embed()--> (B, L, D) --transformer--> hidden (B, L, D)
    hidden at a position whose next token is an image token --condition()--> c --image_head--> velocity
    hidden elsewhere --lm_head--> logits

Parallel decoding (``config.parallel_tokens`` = K > 1): the hidden state before token t also conditions the head for
tokens t+1 .. t+K-1, each corrected by ``image_ahead`` (an MLP of the state and the token just before the target:
sampled, or teacher-forced in training), so a decoder feeds K tokens per backbone forward. ``image_reread``
(``config.reread_width`` > 0, ``nextstep train-reread``) corrects the one state a parallel decoder draws from after
reading a draft rather than its token (``NextStep.reread``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import quant
from ..checkpoint import (
    assign_state_dict,
    iter_safetensors,
    read_json,
    require_dir,
    safetensors_files,
    save_safetensors_sharded,
    write_json,
)
from ..config import NextStepConfig
from ..errors import InputError
from ..sampling.noise import randn
from .flow_head import FlowHead
from .kv_cache import KVCache
from .latents import patchify, sincos_2d_table, token_grid
from .transformer import Transformer


@dataclass
class LossOutput:
    loss: torch.Tensor  # lm_loss * lm_loss_weight + im_loss * im_loss_weight (differentiable)
    lm_loss: torch.Tensor  # detached
    im_loss: torch.Tensor  # detached
    lm_count: int = 0  # text positions that entered the CE sum
    im_count: float = 0.0  # (weighted) head rows that entered the flow-loss sum


class AheadAdapter(nn.Module):
    """Parallel decoding's correction of the hidden state before token s for the token ``ahead`` positions after s
    (ahead 2 .. K): an MLP of the state and the token just before that target, as the backbone reads it (what a
    sequential decoder would have fed the backbone since), plus an offset embedding; its output is added to the
    state. Width 2 x hidden. Fine-tuning it alone leaves sequential decoding exactly as it was."""

    def __init__(self, dim: int, token_dim: int, k: int):
        super().__init__()
        width = 2 * dim
        self.fc1 = nn.Linear(dim + token_dim, width)
        self.offsets = nn.Parameter(torch.zeros(k - 1, width))
        self.fc2 = nn.Linear(width, dim)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.fc1.weight, std=0.02, generator=generator)
        for p in (self.fc1.bias, self.offsets, self.fc2.weight, self.fc2.bias):
            nn.init.zeros_(p)

    def forward(self, hidden: torch.Tensor, prev: torch.Tensor, ahead: int) -> torch.Tensor:
        """hidden (..., D), prev (..., token_dim) -> (..., D) to add to ``hidden``."""
        x = self.fc1(torch.cat([hidden, prev.to(hidden.dtype)], -1)) + self.offsets[ahead - 2]
        return self.fc2(F.silu(x))


class RereadCorrection(nn.Module):
    """Parallel decoding's correction of the state ``after`` a draft toward the state after the token drawn for it:
    an MLP of that state, the state ``before`` the draft, the token and its difference from the draft (both as the
    backbone reads them), whose output is added to ``after`` (``NextStep.reread``). Trained by regression on the
    states a parallel decoder meets (``nextstep train-reread``); its output starts at zero."""

    def __init__(self, dim: int, token_dim: int, width: int):
        super().__init__()
        self.fc1 = nn.Linear(2 * dim + 2 * token_dim, width)
        self.fc2 = nn.Linear(width, dim)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.fc1.weight, std=0.02, generator=generator)
        for p in (self.fc1.bias, self.fc2.weight, self.fc2.bias):
            nn.init.zeros_(p)

    def forward(self, before: torch.Tensor, after: torch.Tensor, drafted: torch.Tensor, token: torch.Tensor
                ) -> torch.Tensor:
        """before, after (..., D); drafted, token (..., token_dim) -> (..., D) to add to ``after``."""
        token = token.to(after.dtype)
        x = torch.cat([before, after, token - drafted.to(after.dtype), token], -1)
        return self.fc2(F.silu(self.fc1(x)))


class NextStep(nn.Module):
    def __init__(self, config: NextStepConfig):
        super().__init__()
        self.config = config
        t = config.transformer
        # built from a table of zeros (loading or ``init_weights`` fills it): nn.Embedding's own N(0, 1) draw would
        # be overwritten, and on ``meta`` it imports torch._dynamo, 0.6-1 s of every process that loads a model
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size, _weight=torch.zeros(t.vocab_size, t.hidden_size))
        self.transformer = Transformer(t)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        if t.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.image_in_projector = nn.Linear(config.token_dim, t.hidden_size)
        self.image_out_projector = nn.Linear(t.hidden_size, t.hidden_size)
        self.image_head = FlowHead(config.token_dim, t.hidden_size, config.head)
        if config.parallel_tokens > 1:
            self._add_ahead(config.parallel_tokens)
        if config.reread_width:
            self._add_reread(config.reread_width)
        self._position_table: tuple[tuple, torch.Tensor] | None = None  # the last grid's (key, (h*w, D) table)

    # ---- construction -------------------------------------------------------------------------------------------
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> NextStep:
        """Fresh-training initialisation: N(0, std) linears/embeddings, unit norms, DiT-style head."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std, generator=generator)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "transformer.norm.weight":
                nn.init.ones_(p)
        self.image_head.net.init_weights(generator)
        if self.config.parallel_tokens > 1:
            self.image_ahead.reset_parameters(generator)  # its output starts at zero
        if self.config.reread_width:
            self.image_reread.reset_parameters(generator)  # its output starts at zero
        return self

    def _add_ahead(self, k: int, generator: torch.Generator | None = None) -> None:
        """Fresh parallel-decoding parameters for K = ``k``: ``image_ahead`` with its last layer at zero."""
        w = self.embed_tokens.weight
        with torch.device(w.device):
            self.image_ahead = AheadAdapter(self.config.transformer.hidden_size, self.config.token_dim, k).to(w.dtype)
        if w.device.type != "meta":
            self.image_ahead.reset_parameters(generator)

    def _add_reread(self, width: int, generator: torch.Generator | None = None) -> None:
        w = self.embed_tokens.weight
        with torch.device(w.device):
            self.image_reread = RereadCorrection(self.config.transformer.hidden_size, self.config.token_dim,
                                                 width).to(w.dtype)
        if w.device.type != "meta":
            self.image_reread.reset_parameters(generator)

    def enable_reread(self, width: int, generator: torch.Generator | None = None) -> NextStep:
        """Add a fresh ``image_reread`` of ``width`` (output zero: decoding unchanged until it is trained) to a
        model trained for parallel decoding, replacing any it has."""
        if self.config.parallel_tokens < 2:
            raise InputError("a reread correction needs a model trained for parallel decoding (parallel_tokens > 1)")
        if width < 1:
            raise InputError(f"the reread correction's width must be >= 1, got {width}")
        self.config.reread_width = width
        self._add_reread(width, generator)
        return self

    def enable_parallel(self, k: int, generator: torch.Generator | None = None) -> NextStep:
        """Train this model to predict ``k`` tokens per hidden state (fine-tuning a K = 1 model for parallel
        decoding): adds the parallel-decoding parameters (``AheadAdapter``), whose output starts at zero."""
        if k == self.config.parallel_tokens:
            return self
        if self.config.parallel_tokens != 1:
            raise InputError(f"this model was trained for parallel_tokens={self.config.parallel_tokens}; "
                             f"changing it to {k} is not supported")
        self.config.parallel_tokens = k
        if k > 1:
            self._add_ahead(k, generator)
        return self

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    # ---- embedding ----------------------------------------------------------------------------------------------
    def image_tokens(self, latents: torch.Tensor | Sequence[torch.Tensor]
                     ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Latents -> (N, token_dim) tokens of all images in order, and each image's token grid.

        ``latents``: a (n, C, h, w) tensor (n images of one size) or a sequence of (C, h, w) / (1, C, h, w)
        tensors (any sizes)."""
        if isinstance(latents, torch.Tensor):
            if latents.dim() != 4:
                raise ValueError(f"latents must be (n, C, h, w), got shape {tuple(latents.shape)}")
            latents = list(latents)
        toks, grids = [], []
        p = self.config.patch_size
        for z in latents:
            z = z if z.dim() == 4 else z[None]
            if z.shape[0] != 1 or z.shape[1] != self.config.latent_channels:
                raise ValueError(f"each latent must be (C={self.config.latent_channels}, h, w), got {tuple(z.shape)}")
            grids.append(token_grid(tuple(z.shape[-2:]), p))
            toks.append(patchify(z, p)[0])
        return torch.cat(toks, 0), grids

    def embed(self, input_ids: torch.Tensor, latents: torch.Tensor | Sequence[torch.Tensor] | None = None,
              token_noise: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) embeddings; image placeholders take ``image_in_projector`` of the image tokens,
        filled in raster order over the batch (row 0's images first). ``token_noise`` (N, token_dim), one row per
        image token, is added to the tokens first (``config.context_noise``)."""
        is_img = input_ids == self.config.image_placeholder_id
        n_slots = int(is_img.sum())
        if latents is None or (not isinstance(latents, torch.Tensor) and len(latents) == 0):
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image placeholders but no latents were given")
            return self.embed_tokens(input_ids)
        tokens, _ = self.image_tokens(latents)
        if tokens.shape[0] != n_slots:
            raise ValueError(f"input_ids hold {n_slots} image placeholders but the latents give {tokens.shape[0]} "
                             f"tokens")
        if token_noise is not None:
            tokens = tokens + token_noise.to(tokens)
        out = torch.zeros(*input_ids.shape, self.config.transformer.hidden_size, device=self.device, dtype=self.dtype)
        out[~is_img] = self.embed_tokens(input_ids[~is_img])
        out[is_img] = self.image_in_projector(tokens.to(self.dtype)).to(out.dtype)
        return out

    def embed_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., token_dim) sampled tokens -> (..., D) backbone inputs (the next decoding step)."""
        return self.image_in_projector(tokens)

    # ---- backbone and heads -------------------------------------------------------------------------------------
    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) embeddings -> (B, T, D) final hidden states (see ``Transformer.forward``)."""
        return self.transformer(embeds, attention_mask=attention_mask, cache=cache, input_pos=input_pos)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return self.transformer.new_cache(batch, max_len)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def position_embedding(self, index: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(...) raster indices of image tokens in a ``grid`` = (rows, cols) -> (..., D) 2-D sin/cos embedding."""
        key = (tuple(grid), self.device, self.dtype)
        if self._position_table is None or self._position_table[0] != key:  # one table kept: not rebuilt per token
            table = sincos_2d_table(self.config.transformer.hidden_size, *grid).to(self.device, self.dtype)
            self._position_table = (key, table)
        return self._position_table[1][index]

    def condition(self, hidden: torch.Tensor, index: torch.Tensor | None = None,
                  grid: tuple[int, int] | None = None, prev: torch.Tensor | None = None, ahead: int = 1
                  ) -> torch.Tensor:
        """The flow head's condition for the image token at raster ``index`` of ``grid``, from the hidden state
        (..., D) of the position ``ahead`` tokens before it (1: the position just before it). With ``ahead`` > 1
        (parallel decoding) ``prev`` (..., token_dim) is the token just before it as the backbone reads it (context
        noise included). Used identically by training and sampling."""
        if ahead > 1:
            if not 1 < ahead <= self.config.parallel_tokens:
                raise InputError(f"this model predicts at most {self.config.parallel_tokens} token(s) per hidden "
                                 f"state, asked for {ahead}")
            hidden = hidden + self.image_ahead(hidden, prev, ahead)
        if self.config.use_gen_pos_embed:
            if index is None or grid is None:
                raise ValueError("use_gen_pos_embed needs the token index and grid")
            hidden = hidden + self.position_embedding(index, grid).reshape(*index.shape, -1)
        return self.image_out_projector(hidden)

    def reread(self, before: torch.Tensor, after: torch.Tensor, drafted: torch.Tensor, token: torch.Tensor
               ) -> torch.Tensor:
        """Parallel decoding: the state ``after`` (..., D) the backbone read a draft, moved toward the state after
        the token drawn for it instead (both as read; ``before``: the state before them): by the trained correction
        ``image_reread`` where the model has one, else by the ahead adapter's change from the one to the other, its
        estimate of what the backbone would have learnt from the token rather than the draft
        (docs/parallel-decoding.md)."""
        if self.config.reread_width:
            return after + self.image_reread(before, after, drafted, token)
        return after + self.image_ahead(before, token, 2) - self.image_ahead(before, drafted, 2)

    def conditions(self, states: torch.Tensor, fed: torch.Tensor | None, grid: tuple[int, int], ahead: int = 1
                   ) -> torch.Tensor:
        """The head's conditions of one image's tokens ``ahead - 1`` .. n-1, teacher-forced: ``states`` (..., n, D)
        the hidden state before each token, ``fed`` (..., n - 1 or more, token_dim) the tokens as the backbone reads
        them (context noise included; unused for ``ahead`` 1) -> (..., n - ahead + 1, D). Token t is conditioned on
        the state before token t - ahead + 1 and token t - 1: what parallel decoding gives it (``condition``)."""
        n = states.shape[-2]
        index = torch.arange(ahead - 1, n, device=states.device).expand(*states.shape[:-2], n - ahead + 1)
        prev = fed[..., ahead - 2:n - 1, :] if ahead > 1 else None
        return self.condition(states[..., :n - ahead + 1, :], index, grid, prev, ahead)

    # ---- training loss ------------------------------------------------------------------------------------------
    def loss(self, input_ids: torch.Tensor, latents: torch.Tensor | Sequence[torch.Tensor] | None = None,
             labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             image_loss_mask: torch.Tensor | None = None,
             generator: torch.Generator | Sequence[torch.Generator] | None = None,
             normalizers: tuple[float, float] | None = None, base_targets: torch.Tensor | None = None,
             base: Callable[[], ContextManager] | None = None) -> LossOutput:
        """Next-token loss on a batch of mixed sequences.

        Text: cross-entropy at every position whose next token is not an image placeholder (this includes
        predicting ``<boi>`` and ``<eoi>``); labels default to ``input_ids`` (-100 and padding are ignored).
        Images: flow-matching loss on the condition of every position whose next token is an image placeholder,
        against that image token, each token drawn ``head.batch_mul`` times; ``image_loss_mask`` (n_images,)
        weights images (0 switches one off, e.g. an edit's source).

        ``generator``: one generator for all head noise, or one per image (noise then independent of how images
        are split across batches or ranks). ``normalizers``: divide the text and image sums by these counts
        instead of the local ones (distributed training divides by the global counts).

        ``base_targets`` (n_images,) bool with ``base``, a context in which this model computes its base model (e.g.
        ``lora.adapters_disabled``): the flow target of the marked images is the base's velocity at the same x_t and
        t, from the base's own hidden states, instead of the data's (self-distillation: a fine-tune keeps the base's
        behaviour on replayed data, and the loss and its gradient start at zero there). The base's forward runs
        whenever ``base_targets`` is given, even with no image marked: under FSDP2 every rank makes the same calls.
        """
        cfg = self.config
        noise = None
        if cfg.context_noise > 0 and latents is not None:
            noise = self._context_noise(latents, image_loss_mask, generator)
        embeds = self.embed(input_ids, latents, noise)
        hidden = self.forward(embeds, attention_mask=attention_mask)[:, :-1]  # (B, L-1, D)
        next_is_img = (input_ids == cfg.image_placeholder_id)[:, 1:]
        labels = (input_ids if labels is None else labels)[:, 1:]
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask[:, 1:] == 0, -100)
        text_labels = labels[~next_is_img]
        text_logits = self.lm_head(hidden[~next_is_img]).float()
        lm_sum = F.cross_entropy(text_logits, text_labels, ignore_index=-100, reduction="sum")
        lm_count = int((text_labels != -100).sum())

        im_sum, im_count = hidden.new_zeros((), dtype=torch.float32), 0.0
        if latents is not None and int(next_is_img.sum()) > 0 and cfg.im_loss_weight > 0:
            reference = None
            if base_targets is not None:  # even where none is marked: under FSDP2 every rank makes the same calls
                if base is None:
                    raise ValueError("base_targets needs base: a context in which the model computes its base")
                with torch.no_grad(), base():
                    base_hidden = self.forward(self.embed(input_ids, latents, noise),
                                               attention_mask=attention_mask)[:, :-1][next_is_img]
                reference = (base_hidden, base_targets.to(hidden.device, torch.bool), base)
            im_sum, im_count = self._image_loss_sum(hidden[next_is_img], latents, image_loss_mask, generator, noise,
                                                    reference)
        lm_norm, im_norm = normalizers if normalizers is not None else (lm_count, im_count)
        lm_loss = lm_sum / max(lm_norm, 1)
        im_loss = im_sum / max(im_norm, 1e-8)
        loss = lm_loss * cfg.lm_loss_weight + im_loss * cfg.im_loss_weight
        return LossOutput(loss, lm_loss.detach(), im_loss.detach(), lm_count, im_count)

    def _context_noise(self, latents, image_loss_mask, generator) -> torch.Tensor:
        """(N, token_dim) input noise: ``context_noise`` * N(0, 1) on the tokens of every image with a loss weight
        (the images being generated), zero on the others (an edit's source). Drawn before the head's noise, from
        the image's own generator when there is one per image."""
        counts = [math.prod(token_grid(tuple(z.shape[-2:]), self.config.patch_size)) for z in latents]
        weights = [1.0] * len(counts) if image_loss_mask is None else image_loss_mask.tolist()
        gens = list(generator) if isinstance(generator, Sequence) else [generator] * len(counts)
        if len(gens) != len(counts):
            raise ValueError(f"got {len(gens)} generators for {len(counts)} images")
        d, parts = self.config.token_dim, []
        for n, wt, g in zip(counts, weights, gens):
            if wt > 0:
                parts.append(randn((n, d), g, self.device) * self.config.context_noise)
            else:
                parts.append(torch.zeros(n, d, device=self.device))
        return torch.cat(parts)

    def _image_loss_sum(self, hidden: torch.Tensor, latents, image_loss_mask, generator, token_noise=None,
                        reference=None):
        """hidden (N, D): states before each image token, in image order -> (sum of weighted row losses, weight).
        With ``parallel_tokens`` K > 1 every token t also has a row for each ``ahead`` in 2..K (the state before
        token t-ahead+1, the token before t as read with ``token_noise``), drawn after the plain rows.
        ``reference``: (the base's hidden states like ``hidden``, (n_images,) bool, the base's context): the marked
        images' rows take the base's velocity as their target (``loss``'s ``base_targets``)."""
        target, grids = self.image_tokens(latents)
        fed = target if token_noise is None else target + token_noise.to(target)
        sizes = [h * w for h, w in grids]
        m = self.config.head.batch_mul
        weights = (torch.ones(len(grids), device=hidden.device) if image_loss_mask is None
                   else image_loss_mask.to(hidden.device, torch.float32))
        parts = []  # (image, ahead, conds (r, D), targets (r, token_dim)) for every ahead, the plain rows first
        for ahead in range(1, self.config.parallel_tokens + 1):
            for i, (hs, t, x, n, g) in enumerate(zip(hidden.split(sizes), target.split(sizes), fed.split(sizes), sizes,
                                                     grids)):
                if n < ahead:
                    continue
                parts.append((i, ahead, self.conditions(hs, x, g, ahead), t[ahead - 1:]))
        rows_t = torch.cat([t.repeat(m, 1) for *_, t in parts]).to(hidden.dtype)
        rows_c = torch.cat([c.repeat(m, 1) for *_, c, _ in parts])
        rows_w = torch.cat([weights[i].expand(t.shape[0] * m) for i, *_, t in parts])
        if isinstance(generator, Sequence):
            if len(generator) != len(sizes):
                raise ValueError(f"got {len(generator)} generators for {len(sizes)} images")
            draws = [self.image_head.draw(t.shape[0] * m, generator[i], rows_t.device, rows_t.dtype)
                     for i, *_, t in parts]
            noise, u = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
        else:
            noise, u = self.image_head.draw(rows_t.shape[0], generator, rows_t.device, rows_t.dtype)
        velocity = None
        if reference is not None:
            velocity = self._base_velocity(reference, parts, fed, sizes, grids, rows_t, noise)
        per_row = self.image_head.row_losses(rows_t, rows_c, noise, u, velocity)
        return (per_row * rows_w).sum(), float(rows_w.sum())

    def _base_velocity(self, reference, parts, fed, sizes, grids, rows_t, noise):
        """The target velocity of every row (``row_losses``' ``velocity``): the base's at (x_t, t) on the rows of
        the marked images, the data's (target - noise) on the others."""
        base_hidden, marked, base = reference
        m, marked = self.config.head.batch_mul, marked.tolist()
        rows = torch.cat([torch.full((t.shape[0] * m,), marked[i], device=noise.device)
                          for i, *_, t in parts]).nonzero().squeeze(1)
        hs, xs = base_hidden.split(sizes), fed.split(sizes)
        with torch.no_grad(), base():  # the marked images' conditions only, in row order (maybe none)
            conds = [self.conditions(hs[i], xs[i], grids[i], ahead).repeat(m, 1) for i, ahead, *_ in parts
                     if marked[i]]
            conds = torch.cat(conds) if conds else base_hidden.new_zeros(0, base_hidden.shape[-1])

        def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), base():
                v = self.image_head.net(x_t[rows], t[rows], conds)
            return (rows_t - noise).index_copy(0, rows, v.to(rows_t.dtype))

        return velocity

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu", quantize: str | None = None) -> NextStep:
        """Build from a model directory (official NextStep-1/1.1 layout or ours): ``config.json`` + safetensors.

        The model is built on ``meta``, every key and shape is checked against the files' headers, then each tensor
        is read once, in file order, straight into the model (``checkpoint.assign_state_dict``): host memory peaks
        near what the model holds, whatever the shard sizes (``benchmarks/load_memory.py`` measures it).
        ``quantize`` ("int8" or "fp8", see ``nextstep.quant``) quantizes every linear layer as its weight is read, a
        block of rows at a time, so the float weights are never in memory (host peak near the quantized size); the
        result equals loading in float and then ``quant.quantize_``, bit for bit. ``dtype`` is then the compute
        dtype."""
        model_dir = require_dir(path, "model")
        config = NextStepConfig.from_official(read_json(model_dir / "config.json", "model config.json"))
        if quantize is not None:
            quant.check_kind(quantize)
        with torch.device("meta"):
            model = cls(config)
        tied = config.transformer.tie_word_embeddings
        tensors = [(official_to_ours(k), t) for k, t in iter_safetensors(safetensors_files(model_dir))
                   if not (tied and k == "lm_head.weight")]
        if tied:  # a tied lm_head shares the embedding: load it once, then re-tie after assignment
            del model.lm_head.weight
            model.lm_head.register_parameter("weight", None)
        quantizer = quant.LoadTimeQuantizer(model, quantize, dtype, device) if quantize is not None else None
        assign_state_dict(model, tensors, source=str(model_dir), dtype=dtype, device=device,
                          ignore=OFFICIAL_IGNORED_KEYS, take=quantizer)
        if quantizer is not None:
            quantizer.finish()
        if tied:
            model.lm_head.weight = model.embed_tokens.weight
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> None:
        """Write ``config.json`` (official NextStep-1 schema) and safetensors with official key names (sharded as
        Hugging Face does with ``max_shard_bytes``), plus the ``gen_pos_embed`` buffer the official loader wants.
        A quantized model is refused: these files hold float weights (save the float model; quantize when loading)."""
        kind = quant.quantized_kind(self)
        if kind is not None:
            raise InputError(f"this model is quantized ({kind}) and save_pretrained writes float checkpoints only: "
                             f"save the float model and load it with from_pretrained(..., quantize={kind!r})")
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        state = {ours_to_official(k): v for k, v in self.state_dict().items()}
        if cfg.transformer.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        g = cfg.base_image_grid_size
        state["gen_pos_embed"] = sincos_2d_table(cfg.transformer.hidden_size, g, g)[None]
        save_safetensors_sharded(state, out, max_shard_bytes)
        write_json(cfg.to_official("v1"), out / "config.json")


# ---- official key names <-> ours ---------------------------------------------------------------------------------
# Official checkpoints keep the backbone at the top level (``layers.N.*``, ``norm.*``); ours nests it under
# ``transformer.``. These two functions are the only place that knows it.
_BACKBONE_PREFIXES = ("layers.", "norm.")
OFFICIAL_IGNORED_KEYS = ("gen_pos_embed",)  # a buffer we recompute for the real grid


def official_to_ours(key: str) -> str:
    return "transformer." + key if key.startswith(_BACKBONE_PREFIXES) else key


def ours_to_official(key: str) -> str:
    return key[len("transformer."):] if key.startswith("transformer.") else key
