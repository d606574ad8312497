"""Exact per-channel rescaling of torch transformer weights (function-preserving).

A *fold site* is a set of ``width`` channels that leave some parameters ("producers") and enter others
("consumers") through maps that are linear per channel. Scaling channel ``j`` of the producers by
``f_j`` and the consumers' matching input channel by ``1 / f_j`` leaves the function unchanged:

* **norm** (RMSNorm/LayerNorm -> Linear): ``W (g ⊙ n(x) + b) = (W diag(1/f)) ((g ⊙ f) ⊙ n(x) + b ⊙ f)``,
  so ``g_j *= f_j``, ``b_j *= f_j`` and column ``j`` of every consuming ``[out, in]`` Linear weight
  (q/k/v, gate/up) is divided by ``f_j``. Only pre-norm blocks qualify: a post-norm LayerNorm (BERT)
  also feeds the residual, which would see the scaled channels.
* **v_o** (V projection -> output projection): softmax mixes tokens, never channels, so the context
  for query head ``h``, dim ``d`` is ``Σ_t p_{h,t} v_{t, kv(h)·hd + d}``; scaling V's output row
  ``c = kv·hd + d`` (and its bias) by ``f_c`` scales that context channel, and o_proj's input column
  ``h·hd + d`` is divided by ``f_{kv(h)·hd + d}`` with ``kv(h) = h // (n_heads / n_kv_heads)`` (GQA).
* **up_down** (SwiGLU): ``down(silu(gate x) ⊙ (up x))``; scaling up's output row ``c`` by ``f_c`` scales
  the product's channel ``c``, which down's input column ``c`` undoes.

Used to move real weights off a quantization grid without changing the model (``random_rescale_``)
and, with one chosen factor vector, to inject activation outliers into built models. Sites are found
by module structure: Llama-style decoders (``input_layernorm``, ``post_attention_layernorm``,
``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``; Llama, Mistral, Qwen2 and the like; norm
sites only where the norm computes ``weight * normalized``, checked numerically, so Gemma's
``(1 + weight) * normalized`` gets none), GPT-2 blocks (``ln_1 -> attn.c_attn``, ``ln_2 -> mlp.c_fc``,
Conv1D weights ``[in, out]``) and BERT layers (``attention.self.value -> attention.output.dense``).
Sites touching a tied parameter (an LM head shared with the embedding) are skipped: dividing it would
change the embedding as well.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["ScaleTarget", "FoldSite", "SITE_KINDS", "fold_sites", "apply_channel_factors_", "random_rescale_"]

logger = logging.getLogger(__name__)

SITE_KINDS = ("norm", "v_o", "up_down")


@dataclass(frozen=True)
class ScaleTarget:
    """One parameter scaled along one axis.

    Attributes:
        param: parameter name as in ``model.named_parameters()``.
        axis: axis of the parameter that the factors run along.
        index: for each position along ``axis``, which factor applies; None means position ``i`` uses
            factor ``i`` (the axis length must equal the site width).
    """

    param: str
    axis: int
    index: tuple[int, ...] | None = None


@dataclass(frozen=True)
class FoldSite:
    """Channels where ``multiply`` targets can absorb ``f`` and ``divide`` targets ``1 / f`` exactly."""

    name: str
    kind: str
    width: int
    multiply: tuple[ScaleTarget, ...]
    divide: tuple[ScaleTarget, ...]

    def params(self) -> tuple[str, ...]:
        return tuple(t.param for t in self.multiply + self.divide)


def _names(model) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules(remove_duplicate=False)}


def _pname(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr


def _vec(module_name: str, module, attr: str, axis: int, index=None) -> list[ScaleTarget]:
    """Target for ``module.<attr>`` if it exists (a bias may be None)."""
    return (
        [ScaleTarget(_pname(module_name, attr), axis, index)]
        if getattr(module, attr, None) is not None
        else []
    )


def _llama_sites(model, kinds: set[str]) -> list[FoldSite]:
    names = _names(model)
    sites: list[FoldSite] = []
    for module in model.modules():
        if not all(
            hasattr(module, a) for a in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
        ):
            continue
        attn, mlp = module.self_attn, module.mlp
        if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            continue
        layer = names[id(module)]
        n = lambda m: names[id(m)]  # noqa: E731
        if "norm" in kinds and _scales_with_weight(module.input_layernorm):
            norm = module.input_layernorm
            sites.append(
                FoldSite(
                    f"{n(norm)}",
                    "norm",
                    norm.weight.shape[0],
                    tuple(_vec(n(norm), norm, "weight", 0) + _vec(n(norm), norm, "bias", 0)),
                    tuple(
                        ScaleTarget(_pname(n(lin), "weight"), 1)
                        for lin in (attn.q_proj, attn.k_proj, attn.v_proj)
                    ),
                )
            )
            norm = module.post_attention_layernorm
            if all(hasattr(mlp, a) for a in ("gate_proj", "up_proj")) and _scales_with_weight(norm):
                sites.append(
                    FoldSite(
                        f"{n(norm)}",
                        "norm",
                        norm.weight.shape[0],
                        tuple(_vec(n(norm), norm, "weight", 0) + _vec(n(norm), norm, "bias", 0)),
                        tuple(
                            ScaleTarget(_pname(n(lin), "weight"), 1) for lin in (mlp.gate_proj, mlp.up_proj)
                        ),
                    )
                )
        if "v_o" in kinds:
            n_heads, n_kv, head_dim = _attention_shape(attn)
            group = n_heads // n_kv
            index = tuple((h // group) * head_dim + d for h in range(n_heads) for d in range(head_dim))
            sites.append(
                FoldSite(
                    f"{layer}.v_o",
                    "v_o",
                    n_kv * head_dim,
                    tuple(
                        _vec(n(attn.v_proj), attn.v_proj, "weight", 0)
                        + _vec(n(attn.v_proj), attn.v_proj, "bias", 0)
                    ),
                    (ScaleTarget(_pname(n(attn.o_proj), "weight"), 1, index),),
                )
            )
        if "up_down" in kinds and all(hasattr(mlp, a) for a in ("up_proj", "down_proj")):
            sites.append(
                FoldSite(
                    f"{layer}.up_down",
                    "up_down",
                    mlp.up_proj.weight.shape[0],
                    tuple(
                        _vec(n(mlp.up_proj), mlp.up_proj, "weight", 0)
                        + _vec(n(mlp.up_proj), mlp.up_proj, "bias", 0)
                    ),
                    (ScaleTarget(_pname(n(mlp.down_proj), "weight"), 1),),
                )
            )
    # The final norm feeds only the LM head; usable when the head is not tied to the embedding.
    if "norm" in kinds:
        for module in model.modules():
            inner = getattr(module, "model", None)
            head = getattr(module, "lm_head", None)
            if inner is None or head is None or not hasattr(inner, "norm") or not hasattr(inner, "layers"):
                continue
            norm = inner.norm
            if not _scales_with_weight(norm):
                continue
            sites.append(
                FoldSite(
                    names[id(norm)],
                    "norm",
                    norm.weight.shape[0],
                    tuple(_vec(names[id(norm)], norm, "weight", 0) + _vec(names[id(norm)], norm, "bias", 0)),
                    (ScaleTarget(_pname(names[id(head)], "weight"), 1),),
                )
            )
    return sites


def _scales_with_weight(norm) -> bool:
    """True if the norm computes ``weight * n(x) (+ bias)``, so that scaling ``weight`` scales its output;
    not so for Gemma-style ``(1 + weight) * n(x)``, which a norm site would silently change. Checked
    numerically on a fixed input (the weight is restored)."""
    import torch

    weight = getattr(norm, "weight", None)
    if weight is None or weight.dim() != 1:
        return False
    x = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    bias = getattr(norm, "bias", None)
    offset = bias if isinstance(bias, torch.Tensor) else 0.0
    saved = weight.detach().clone()
    with torch.no_grad():
        base = norm(x) - offset
        weight.mul_(2.0)
        doubled = norm(x) - offset
        weight.copy_(saved)
    if not torch.allclose(doubled, 2.0 * base, rtol=1e-3, atol=1e-5):
        logger.debug("no norm fold site at %s: its output does not scale with its weight", type(norm).__name__)
        return False
    return True


def _attention_shape(attn) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim) of a Llama-style attention module."""
    config = getattr(attn, "config", None)
    head_dim = getattr(attn, "head_dim", None) or getattr(config, "head_dim", None)
    if head_dim is None:
        raise ValueError(f"cannot tell the head size of {type(attn).__name__}")
    n_heads = attn.o_proj.weight.shape[1] // head_dim
    n_kv = attn.v_proj.weight.shape[0] // head_dim
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"{type(attn).__name__}: {n_heads} query heads do not split into {n_kv} KV groups")
    return n_heads, n_kv, head_dim


def _gpt2_sites(model, kinds: set[str]) -> list[FoldSite]:
    names = _names(model)
    sites: list[FoldSite] = []
    if "norm" not in kinds:
        return sites
    for module in model.modules():
        if not all(hasattr(module, a) for a in ("ln_1", "attn", "ln_2", "mlp")) or not hasattr(
            module.attn, "c_attn"
        ):
            continue
        # Conv1D stores weight as [in, out]: the input channel is axis 0.
        for norm, lin in ((module.ln_1, module.attn.c_attn), (module.ln_2, module.mlp.c_fc)):
            sites.append(
                FoldSite(
                    names[id(norm)],
                    "norm",
                    norm.weight.shape[0],
                    tuple(_vec(names[id(norm)], norm, "weight", 0) + _vec(names[id(norm)], norm, "bias", 0)),
                    (ScaleTarget(_pname(names[id(lin)], "weight"), 0),),
                )
            )
    for module in model.modules():
        inner, head = getattr(module, "transformer", None), getattr(module, "lm_head", None)
        if inner is None or head is None or not hasattr(inner, "ln_f"):
            continue
        norm = inner.ln_f
        sites.append(
            FoldSite(
                names[id(norm)],
                "norm",
                norm.weight.shape[0],
                tuple(_vec(names[id(norm)], norm, "weight", 0) + _vec(names[id(norm)], norm, "bias", 0)),
                (ScaleTarget(_pname(names[id(head)], "weight"), 1),),
            )
        )
    return sites


def _bert_sites(model, kinds: set[str]) -> list[FoldSite]:
    names = _names(model)
    sites: list[FoldSite] = []
    if "v_o" not in kinds:
        return sites
    for module in model.modules():
        attention = getattr(module, "attention", None)
        if attention is None or not hasattr(attention, "self") or not hasattr(attention, "output"):
            continue
        value, dense = attention.self.value, attention.output.dense
        sites.append(
            FoldSite(
                f"{names[id(module)]}.v_o",
                "v_o",
                value.weight.shape[0],
                tuple(_vec(names[id(value)], value, "weight", 0) + _vec(names[id(value)], value, "bias", 0)),
                (ScaleTarget(_pname(names[id(dense)], "weight"), 1),),
            )
        )
    return sites


def fold_sites(model, kinds: Iterable[str] = SITE_KINDS) -> list[FoldSite]:
    """Every place of ``model`` where per-channel factors fold exactly, skipping tied parameters.

    Args:
        model: a torch module containing Llama-style, GPT-2 or BERT blocks (HF transformers classes
            or anything with the same attribute structure), possibly wrapped.
        kinds: which sites to return, a subset of ``SITE_KINDS``.

    Returns:
        The sites in module order; empty if the architecture is not recognised.
    """
    kinds = set(kinds)
    unknown = kinds - set(SITE_KINDS)
    if unknown:
        raise ValueError(f"unknown fold-site kinds {sorted(unknown)}; expected a subset of {SITE_KINDS}")
    sites = _llama_sites(model, kinds) + _gpt2_sites(model, kinds) + _bert_sites(model, kinds)
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    shared = {name for names in owners.values() if len(names) > 1 for name in names}
    kept = []
    for site in sites:
        tied = [p for p in site.params() if p in shared]
        if tied:
            logger.debug("skipping fold site %s: %s is tied to another parameter", site.name, tied[0])
            continue
        kept.append(site)
    return kept


def apply_channel_factors_(model, site: FoldSite, factors) -> None:
    """Scales ``site``'s producers by ``factors`` and its consumers by ``1 / factors``, in place.

    Args:
        model: the module ``site`` was found in.
        site: from :func:`fold_sites`.
        factors: positive 1-D tensor of length ``site.width``.
    """
    import torch

    factors = torch.as_tensor(factors, dtype=torch.float64)
    if factors.shape != (site.width,):
        raise ValueError(f"{site.name}: expected {site.width} factors, got shape {tuple(factors.shape)}")
    if not bool(torch.all(factors > 0)) or not bool(torch.all(torch.isfinite(factors))):
        raise ValueError(f"{site.name}: factors must be finite and positive")
    with torch.no_grad():
        for targets, vector in ((site.multiply, factors), (site.divide, 1.0 / factors)):
            for target in targets:
                param = model.get_parameter(target.param)
                v = vector[list(target.index)] if target.index is not None else vector
                if param.shape[target.axis] != v.shape[0]:
                    raise ValueError(
                        f"{target.param}: axis {target.axis} has {param.shape[target.axis]} "
                        f"channels, site {site.name} gives {v.shape[0]} factors"
                    )
                shape = [1] * param.dim()
                shape[target.axis] = -1
                # Multiply in float64 and round once, so W * (1/f) is as close to exact as fp32 allows.
                param.copy_((param.double() * v.view(shape)).to(param.dtype))


def random_rescale_(
    model, *, amplitude: float = 0.7, seed: int = 0, kinds: Iterable[str] = SITE_KINDS
) -> Mapping[str, object]:
    """Applies factors ``f_j = exp(U(-amplitude, amplitude))`` at every fold site, in place.

    The model computes the same function afterwards (up to fp32 rounding) but its Linear weights
    no longer sit on whatever quantization grid they came from.

    Args:
        model: see :func:`fold_sites`.
        amplitude: half-width of the uniform distribution of ``log f``.
        seed: seed of the factor generator (the global torch RNG is not touched).
        kinds: which fold sites to use.

    Returns:
        site name -> the factor tensor applied there.

    Raises:
        ValueError: no fold site was found (unsupported architecture).
    """
    import torch

    if amplitude < 0:
        raise ValueError(f"amplitude must be >= 0, got {amplitude}")
    sites = fold_sites(model, kinds)
    if not sites:
        raise ValueError(
            f"no fold site found in {type(model).__name__}: not a Llama-, GPT-2- or BERT-style model"
        )
    generator = torch.Generator().manual_seed(seed)
    applied = {}
    for site in sites:
        u = torch.rand(site.width, generator=generator, dtype=torch.float64)
        factors = torch.exp((2.0 * u - 1.0) * amplitude)
        apply_channel_factors_(model, site, factors)
        applied[site.name] = factors
    logger.info("rescaled %d fold sites (amplitude %.3g, seed %d)", len(sites), amplitude, seed)
    return applied
