"""Which tensors HFT trains.

The paper selects at the *category* level: in every transformer block, half of the attention matrices, half of the
feed-forward matrices and one of the two norms, with the embeddings, ``lm_head`` and the final norm trained. This
module finds the blocks of any ``transformers`` model generically (the ``nn.ModuleList`` of identical layers), sorts
each block's tensors into categories by the names and types of the modules that own them, and draws the selection
from a private random generator seeded by ``HFTConfig.seed`` alone.

A *unit* is what gets selected: one weight tensor together with the bias of the same module (a bias follows its
weight), or any other parameter on its own (e.g. the 3-D expert tensors of MoE layers in transformers 5).
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence, Set
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Union

import torch
from torch import nn

from ..utils import listing
from .config import HFTConfig
from .engines import full_numel

ATTENTION = "attention"
FEED_FORWARD = "feed_forward"
NORM = "norm"
ROUTER = "router"
OTHER = "other"
EMBEDDING = "embedding"
LM_HEAD = "lm_head"
FINAL_NORM = "final_norm"

BLOCK_CATEGORIES = (ATTENTION, FEED_FORWARD, NORM, ROUTER, OTHER)
OUTSIDE_CATEGORIES = (EMBEDDING, LM_HEAD, FINAL_NORM, OTHER)

_ATTENTION_RE = re.compile(r"attn|attention", re.IGNORECASE)
_FEED_FORWARD_RE = re.compile(
    r"mlp|ffn|feed_?forward|moe|expert|^fc\d*$|^c_fc$|dense_h_to_4h|dense_4h_to_h|gate_proj|up_proj|down_proj"
    r"|gate_up_proj|^w[123]$|^wi(_\d)?$|^wo$|dense_?relu_?dense",
    re.IGNORECASE,
)
_NORM_NAME_RE = re.compile(r"norm|(^|_)ln(_|\d|$)", re.IGNORECASE)
_ROUTER_NAME_RE = re.compile(r"^(gate|router)$|_gate$|^router_", re.IGNORECASE)
# Output heads of task models (the modules PEFT itself trains for SEQ_CLS, TOKEN_CLS and QUESTION_ANS).
_TASK_HEADS = frozenset({"score", "classifier", "qa_outputs"})
# Largest block share of all candidate module lists that still counts as a stack of transformer blocks (so that
# encoder-decoder and vision-language models get both stacks, but small ModuleLists of helpers are ignored).
_MIN_STACK_SHARE = 0.1
# Above this many units, exact subset enumeration is replaced by a randomised greedy search.
_MAX_ENUMERATED_UNITS = 12


@dataclass(frozen=True)
class Unit:
    """A selectable tensor: a weight and the bias that follows it (``params``), as one decision."""

    name: str  # the main parameter's fully qualified name
    params: tuple[str, ...]  # parameter names, main first
    numel: int
    category: str
    block: Optional[int]  # index of the transformer block, None outside the blocks
    short: str  # name inside the block (e.g. "self_attn.q_proj") or the module name outside
    target_name: str  # what target_modules / exclude_modules are matched against


@dataclass(frozen=True)
class ModelLayout:
    """The units of a model, sorted into blocks and categories."""

    block_lists: tuple[str, ...]  # names of the ModuleLists holding the blocks
    num_blocks: int
    units: tuple[Unit, ...]

    def block_units(self) -> list[Unit]:
        return [u for u in self.units if u.block is not None]

    def outside_units(self) -> list[Unit]:
        return [u for u in self.units if u.block is None]


def _matches(patterns: Union[str, Sequence[str], None], name: str) -> bool:
    """PEFT's matching rule: a string is a regex matched against the full name; a list matches names or suffixes."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _is_norm(module: nn.Module, module_name: str) -> bool:
    last = module_name.rsplit(".", 1)[-1]
    return "norm" in type(module).__name__.lower() or _NORM_NAME_RE.search(last) is not None


def find_block_lists(model: nn.Module, layers_pattern: Optional[str] = None) -> list[tuple[str, nn.ModuleList]]:
    """Find the ``nn.ModuleList``\\ s of identical layers that hold the model's transformer blocks.

    Without ``layers_pattern``, every ``ModuleList`` whose children share one class and own parameters is a candidate;
    candidates nested inside another candidate (e.g. a list of experts) are dropped, and so are lists much smaller than
    the largest (helper lists). With ``layers_pattern``, the lists whose name equals it, ends with ``.<pattern>``, or
    fully matches it as a regex are used.
    """
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if layers_pattern is not None:
            if name == layers_pattern or name.endswith("." + layers_pattern) or re.fullmatch(layers_pattern, name):
                candidates.append((name, module))
            continue
        if len({type(child) for child in module}) != 1:
            continue
        numel = sum(full_numel(p) for p in module.parameters())
        if numel == 0:
            continue
        candidates.append((name, module, numel))
    if layers_pattern is not None:
        return candidates
    top_level = [
        c for c in candidates if not any(other[0] != c[0] and c[0].startswith(other[0] + ".") for other in candidates)
    ]
    if not top_level:
        return []
    largest = max(numel for _, _, numel in top_level)
    return [(name, module) for name, module, numel in top_level if numel >= _MIN_STACK_SHARE * largest]


def _group_parameters(module: nn.Module) -> list[tuple[str, ...]]:
    """Group a module's own parameters into units: ``weight`` takes ``bias``, ``X`` takes ``X_bias``."""
    names = [n for n, _ in module.named_parameters(recurse=False)]
    groups: list[tuple[str, ...]] = []
    taken = set()
    for n in names:
        if n in taken:
            continue
        partner = "bias" if n == "weight" else f"{n}_bias"
        if partner in names and partner != n:
            groups.append((n, partner))
            taken.update((n, partner))
    for n in names:
        if n not in taken:
            groups.append((n,))
            taken.add(n)
    # keep the module's own order
    order = {n: i for i, n in enumerate(names)}
    return sorted(groups, key=lambda g: order[g[0]])


def _block_category(module: nn.Module, path_in_block: str, block_has_experts: bool) -> str:
    components = path_in_block.split(".") if path_in_block else []
    last = components[-1] if components else ""
    if _is_norm(module, path_in_block):
        return NORM
    if block_has_experts and ("router" in type(module).__name__.lower() or _ROUTER_NAME_RE.search(last)):
        return ROUTER
    if any(_ATTENTION_RE.search(c) for c in components):
        return ATTENTION
    if any(_FEED_FORWARD_RE.search(c) for c in components):
        return FEED_FORWARD
    return OTHER


def _outside_category(module: nn.Module, module_name: str, input_emb, output_emb) -> str:
    if output_emb is not None and module is output_emb:
        return LM_HEAD
    if not isinstance(module, nn.Embedding) and any(p in _TASK_HEADS for p in module_name.split(".")):
        return LM_HEAD  # a task head is the model's output layer, often freshly initialised: train it like lm_head
    if (input_emb is not None and module is input_emb) or isinstance(module, nn.Embedding):
        return EMBEDDING
    if _is_norm(module, module_name):
        return FINAL_NORM
    return OTHER


def _safe_call(model: nn.Module, method: str) -> Optional[nn.Module]:
    fn = getattr(model, method, None)
    if fn is None:
        return None
    try:
        return fn()
    except (NotImplementedError, AttributeError):
        return None


def embedding_modules(model: nn.Module) -> tuple[Optional[nn.Module], Optional[nn.Module]]:
    """The model's input and output embeddings (``get_input_embeddings`` / ``get_output_embeddings``), if it has them.

    The one definition of "the embeddings" in the package: the units categorised as embedding and lm_head are these
    modules' weights, and so are the tensors whose rows a resized vocabulary changes.
    """
    return _safe_call(model, "get_input_embeddings"), _safe_call(model, "get_output_embeddings")


def embedding_parameter_names(model: nn.Module) -> set[str]:
    """Names (as ``named_parameters`` lists them) of the weights of the input and output embeddings."""
    ids = {id(m.weight) for m in embedding_modules(model) if isinstance(getattr(m, "weight", None), torch.Tensor)}
    return {name for name, param in model.named_parameters() if id(param) in ids}


def analyze_model(model: nn.Module, layers_pattern: Optional[str] = None) -> ModelLayout:
    """Sort every floating-point parameter of ``model`` into units, blocks and categories."""
    block_lists = find_block_lists(model, layers_pattern)
    block_of_module: dict[str, tuple[int, str]] = {}  # block module name -> (block index, its block prefix)
    for list_name, module_list in block_lists:
        for i in range(len(module_list)):
            name = f"{list_name}.{i}" if list_name else str(i)
            block_of_module[name] = (len(block_of_module), name)

    modules = list(model.named_modules())
    blocks_with_experts = set()
    for name, _ in modules:
        block = _enclosing_block(name, block_of_module)
        if block is not None and "expert" in name.rsplit(".", 1)[-1].lower():
            blocks_with_experts.add(block[0])
    input_emb, output_emb = embedding_modules(model)

    seen_params = set()
    units = []
    for module_name, module in modules:
        for group in _group_parameters(module):
            params = [getattr(module, n) for n in group]
            if id(params[0]) in seen_params or not params[0].is_floating_point():
                continue  # tied weights count once; integer (quantised) tensors cannot be trained
            seen_params.update(id(p) for p in params)
            full = tuple(f"{module_name}.{n}" if module_name else n for n in group)
            # target_modules match module names for weight/bias units, parameter names for the rest (MoE experts)
            target_name = module_name if group[0] == "weight" else full[0]
            numel = sum(full_numel(p) for p in params)  # a ZeRO-3 partitioned parameter reports 0 elements
            block = _enclosing_block(module_name, block_of_module)
            if block is None:
                category = _outside_category(module, module_name, input_emb, output_emb)
                units.append(Unit(full[0], full, numel, category, None, target_name, target_name))
                continue
            index, block_name = block
            path_in_block = module_name[len(block_name) + 1:]
            category = _block_category(module, path_in_block, index in blocks_with_experts)
            short = path_in_block if group[0] == "weight" else ".".join(filter(None, [path_in_block, group[0]]))
            units.append(Unit(full[0], full, numel, category, index, short or group[0], target_name))
    return ModelLayout(tuple(n for n, _ in block_lists), len(block_of_module), tuple(units))


def _enclosing_block(module_name: str, block_of_module: dict[str, tuple[int, str]]) -> Optional[tuple[int, str]]:
    parts = module_name.split(".")
    for i in range(len(parts), 0, -1):
        hit = block_of_module.get(".".join(parts[:i]))
        if hit is not None:
            return hit
    return None


# --------------------------------------------------------------------------------------------------------------------
# Drawing the selection
# --------------------------------------------------------------------------------------------------------------------


def _best_subset(
    units: list[Unit],
    goal: Fraction,
    weight: Callable[[Unit], int],
    rng: random.Random,
    avoid: Set[str] = frozenset(),
    rank: Optional[Mapping[str, float]] = None,
) -> list[Unit]:
    """A subset of ``units`` whose total weight is closest to ``goal``; among those, one with the least weight of the
    units named in ``avoid``, then (with ``rank``: unit name -> score) the highest total score; remaining ties are
    broken uniformly at random. A group with any unranked unit is drawn as if there were no ranking."""
    weights = [weight(u) for u in units]
    ranked = rank is not None and all(u.name in rank for u in units)
    if len(set(weights)) <= 1 and not avoid:
        w = weights[0] if weights else 1
        costs = [abs(k * w - goal) for k in range(len(units) + 1)]
        best = min(costs)
        k = rng.choice([k for k, c in enumerate(costs) if c == best])
        if ranked:
            return _by_rank(units, rank, rng)[:k]
        return rng.sample(units, k)
    if len(units) <= _MAX_ENUMERATED_UNITS:
        subsets = [
            combo for r in range(len(units) + 1) for combo in itertools.combinations(range(len(units)), r)
        ]
        costs = [
            (
                abs(sum(weights[i] for i in combo) - goal),
                sum(weights[i] for i in combo if units[i].name in avoid),
                -sum(rank[units[i].name] for i in combo) if ranked else 0,
            )
            for combo in subsets
        ]
        best = min(costs)
        combo = rng.choice([s for s, c in zip(subsets, costs, strict=True) if c == best])
        return [units[i] for i in combo]
    order = list(range(len(units)))
    rng.shuffle(order)
    # stable: preferred units first (then, ranked, the best scores first), each part in random order
    order.sort(key=lambda i: (units[i].name in avoid, -rank[units[i].name] if ranked else 0))
    chosen, total = [], 0
    for i in order:
        if abs(total + weights[i] - goal) < abs(total - goal):
            chosen.append(units[i])
            total += weights[i]
    return chosen


def choose(
    groups: Sequence[Sequence[Unit]],
    ratio: float,
    weight: Callable[[Unit], int],
    rng: random.Random,
    avoid: Set[str] = frozenset(),
    rank: Optional[Mapping[str, float]] = None,
) -> list[Unit]:
    """Choose about ``ratio`` of every group's weight while keeping the running total within one unit of the
    exact share: groups are visited in random order and each one absorbs the rounding error of those before it.
    With equal weights this makes blocks alternate between rounding down and up, at random.

    ``avoid`` (unit names) asks for as few of those units as the structure allows, e.g. the tensors trained in the
    previous stage of a continual run. With equal weights (always the case for the ``"category"``, ``"layer"`` and
    ``"model"`` strategies) the result is provably minimal: see :func:`_choose_avoiding`. With unequal weights
    (``"param_count"`` under grouped-query attention) every group keeps its best-balanced subsets and picks the one
    with the least avoided weight among them, a greedy approximation.
    """
    if avoid and len({weight(u) for group in groups for u in group}) <= 1:
        return _choose_avoiding(groups, ratio, rng, avoid)
    ratio_q = Fraction(ratio)
    order = list(range(len(groups)))
    rng.shuffle(order)
    error = Fraction(0)  # chosen weight minus exact share, so far
    chosen: list[Unit] = []
    for gi in order:
        units = sorted(groups[gi], key=lambda u: u.name)
        if not units:
            continue
        target = ratio_q * sum(weight(u) for u in units)
        subset = _best_subset(units, target - error, weight, rng, avoid, rank)
        error += sum(weight(u) for u in subset) - target
        chosen.extend(subset)
    return chosen


def _choose_avoiding(
    groups: Sequence[Sequence[Unit]], ratio: float, rng: random.Random, avoid: Set[str]
) -> list[Unit]:
    """:func:`choose` for equal weights, drawing the fewest units named in ``avoid`` that the structure allows.

    The structure is the one :func:`choose` guarantees: every group gets the floor or the ceiling of its exact share
    ``ratio * len(group)``, and the total is an integer nearest to ``ratio * (all units)``. Under it, a group that takes
    ``k`` units cannot do with fewer than ``max(0, k - free)`` avoided ones (``free``: its units not avoided), so the
    optimum takes the floors, then spends the remaining "round-ups" first on groups with a free unit to spare (cost
    0), then on the others (cost 1 each); where two totals are equally close, the cheaper one is used. Ties are broken
    at random, and each group fills its count with free units first.
    """
    ratio_q = Fraction(ratio)
    groups = [sorted(g, key=lambda u: u.name) for g in groups if g]
    sizes = [len(g) for g in groups]
    lows = [math.floor(ratio_q * n) for n in sizes]
    highs = [math.ceil(ratio_q * n) for n in sizes]
    free = [sum(u.name not in avoid for u in g) for g in groups]
    exact = ratio_q * sum(sizes)
    nearest = min(abs(t - exact) for t in (math.floor(exact), math.ceil(exact)))
    totals = sorted({t for t in (math.floor(exact), math.ceil(exact)) if abs(t - exact) == nearest})
    cheap = [i for i in range(len(groups)) if highs[i] > lows[i] and free[i] >= highs[i]]
    dear = [i for i in range(len(groups)) if highs[i] > lows[i] and free[i] < highs[i]]
    rng.shuffle(cheap)
    rng.shuffle(dear)

    def overlap(total: int) -> int:
        return sum(max(0, lo - f) for lo, f in zip(lows, free, strict=True)) + max(0, total - sum(lows) - len(cheap))

    best = min(overlap(t) for t in totals)
    total = rng.choice([t for t in totals if overlap(t) == best])
    counts = list(lows)
    for i in (cheap + dear)[: total - sum(lows)]:
        counts[i] += 1
    chosen: list[Unit] = []
    for group, count in zip(groups, counts, strict=True):
        preferred = [u for u in group if u.name not in avoid]
        avoided = [u for u in group if u.name in avoid]
        take = min(count, len(preferred))
        chosen += rng.sample(preferred, take) + rng.sample(avoided, count - take)
    return chosen


def _by_rank(units: Sequence[Unit], rank: Mapping[str, float], rng: random.Random) -> list[Unit]:
    """``units`` from the highest score to the lowest, equal scores in random order."""
    order = list(units)
    rng.shuffle(order)
    order.sort(key=lambda u: -rank[u.name])
    return order


def _count(_: Unit) -> int:
    return 1


def _numel(unit: Unit) -> int:
    return unit.numel


def select_units(
    layout: ModelLayout,
    config: HFTConfig,
    avoid: Collection[str] = (),
    rank: Optional[Mapping[str, float]] = None,
) -> list[Unit]:
    """Draw the units ``config`` asks for from ``layout`` (deterministic in ``config.seed`` and ``avoid``).

    ``avoid`` names parameters to leave out wherever the strategy's structure allows (see :func:`choose`): a unit is
    avoided when any of its parameters is named. Embeddings, ``lm_head`` and the final norm are trained regardless
    when ``train_embeddings`` is set. Without ``avoid`` the draw is exactly the plain one.

    ``rank`` (unit name -> score, higher is trained first; see ``importance.py``) keeps the structure and the
    rounding of the plain draw but, within every group, takes the best-scored units instead of random ones.
    """
    if rank is not None and avoid:
        raise ValueError("A ranked selection cannot also avoid tensors; pass either rank or avoid.")
    if rank is not None and config.strategy == "layer":
        raise ValueError(
            "strategy='layer' trains whole blocks and has nothing to rank within them; use 'category', "
            "'param_count' or 'model' with a ranked selection."
        )
    rng = random.Random(config.seed)
    avoid_names = set(avoid)
    avoided = frozenset(u.name for u in layout.units if avoid_names.intersection(u.params))
    excluded = [u for u in layout.units if _matches(config.exclude_modules, u.target_name)]
    excluded_names = {u.name for u in excluded}

    def in_pool(u: Unit) -> bool:
        if u.name in excluded_names:
            return False
        return config.target_modules is None or _matches(config.target_modules, u.target_name)

    block_pool = [u for u in layout.block_units() if in_pool(u)]
    outside_other = [u for u in layout.outside_units() if u.category == OTHER and in_pool(u)]
    chosen: list[Unit] = []

    if config.strategy in ("category", "param_count"):
        weight = _count if config.strategy == "category" else _numel
        for category in BLOCK_CATEGORIES:
            groups: dict[int, list[Unit]] = defaultdict(list)
            for u in block_pool:
                if u.category == category:
                    groups[u.block].append(u)
            chosen += choose([groups[b] for b in sorted(groups)], config.ratio, weight, rng, avoided, rank)
        chosen += choose([outside_other], config.ratio, weight, rng, avoided, rank)
    elif config.strategy == "model":
        pool = block_pool if layout.num_blocks else [u for u in layout.units if in_pool(u)]
        chosen += choose([pool], config.ratio, _count, rng, avoided, rank)
    elif config.strategy == "layer":
        by_block: dict[int, list[Unit]] = defaultdict(list)
        for u in block_pool:
            by_block[u.block].append(u)
        stand_ins = [Unit(f"block {b:06d}", (), 0, OTHER, b, "", "") for b in sorted(by_block)]
        avoided_blocks = frozenset(s.name for s in stand_ins if any(u.name in avoided for u in by_block[s.block]))
        for stand_in in choose([stand_ins], config.ratio, _count, rng, avoided_blocks):
            chosen += by_block[stand_in.block]

    if config.train_embeddings:
        chosen += [
            u for u in layout.outside_units()
            if u.category in (EMBEDDING, LM_HEAD, FINAL_NORM) and u.name not in excluded_names
        ]
    return chosen


def resolve_selection(
    model: nn.Module,
    config: HFTConfig,
    avoid: Collection[str] = (),
    rank: Optional[Mapping[str, float]] = None,
) -> list[str]:
    """Return the parameter names ``config`` selects in ``model``, in the model's parameter order.

    ``rank``: a score per unit (its main parameter's name; higher trains first) that picks the tensors within the
    strategy's structure instead of the random draw (see :func:`peft_hft.calibrate`).

    ``avoid``: parameter names to leave out where the strategy's structure allows (as few of them as possible are
    drawn; see :func:`select_units`). Continual learning uses it to train tensors the previous stage left alone.

    Raises:
        ValueError: if the model has no transformer blocks for a block-based strategy, or nothing is selected.
    """
    layout = analyze_model(model, config.layers_pattern)
    if layout.num_blocks == 0 and config.strategy != "model":
        hint = (
            f"No ModuleList named {config.layers_pattern!r} was found"
            if config.layers_pattern
            else "No repeated transformer blocks (an nn.ModuleList of identical layers) were found"
        )
        raise ValueError(
            f"{hint} in {type(model).__name__}, so HFT's strategy={config.strategy!r} cannot sort tensors into "
            "blocks. Fix: pass layers_pattern='<name of the ModuleList holding the layers>', use strategy='model' "
            "(a random share of all tensors), or list the tensors to train in selected_parameters."
        )
    check_target_modules(model, layout, config)
    units = select_units(layout, config, avoid, rank)
    names = {p for u in units for p in u.params}
    names |= _extra_trainable(model, layout, config)
    if not names:
        raise ValueError(
            f"HFTConfig selects no tensor of {type(model).__name__} (ratio={config.ratio}, "
            f"target_modules={config.target_modules!r}, exclude_modules={config.exclude_modules!r}). Fix: widen "
            "target_modules, narrow exclude_modules, or raise ratio."
        )
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    return sorted(names, key=order.__getitem__)


def check_target_modules(model: nn.Module, layout: ModelLayout, config: HFTConfig) -> None:
    """Refuse ``target_modules`` that match no tensor of the model (a typo, a regex that matches nothing, ``[]``), as
    PEFT refuses them for LoRA (``NoMatchingPeftModuleError``): HFT would otherwise train only the embeddings,
    ``lm_head`` and the final norm, and no block tensor at all, without a word."""
    if config.target_modules is None or any(_matches(config.target_modules, u.target_name) for u in layout.units):
        return
    from peft import NoMatchingPeftModuleError

    pool = layout.block_units() or list(layout.units)
    shorts = list(dict.fromkeys(u.target_name.rsplit(".", 1)[-1] for u in pool))
    example = pool[0].target_name if pool else None
    raise NoMatchingPeftModuleError(
        f"Target modules {config.target_modules!r} not found in the base model {type(model).__name__}: HFT's "
        "target_modules match module names or suffixes (a list), or one regex against the full module name (a "
        f"string). Modules that exist: {listing(shorts, 12)}" + (f" (full names such as {example!r})" if example
        else "") + ". Fix: correct the names, or leave target_modules unset to draw from every block tensor."
    )


def _extra_trainable(model: nn.Module, layout: ModelLayout, config: HFTConfig) -> set[str]:
    """Tensors trained in full on request: ``modules_to_save`` and, for ``trainable_token_indices``, embeddings."""
    extra: set[str] = set()
    if config.modules_to_save:
        for unit in layout.units:
            module_name = unit.target_name if unit.target_name != unit.name else unit.name.rsplit(".", 1)[0]
            if _matches(list(config.modules_to_save), module_name):
                extra.update(unit.params)
    if config.trainable_token_indices is not None:
        extra.update(p for u in layout.units if u.category in (EMBEDDING, LM_HEAD) for p in u.params)
    return extra


def validate_selection(model: nn.Module, names: Sequence[str]) -> None:
    """Check that every selected name is a floating-point parameter of ``model``, before anything is changed."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        close = sorted(params)[:3]
        raise ValueError(
            f"selected_parameters names {len(missing)} tensor(s) that {type(model).__name__} does not have: "
            f"{listing(missing)}. "
            f"Names must be fully qualified parameter names as listed by model.named_parameters() (e.g. "
            f"{', '.join(close)}). Fix the names, or load the adapter onto the base model it was made for."
        )
    not_float = [n for n in names if not params[n].is_floating_point()]
    if not_float:
        raise ValueError(
            f"HFT can only train floating-point tensors, but {', '.join(not_float[:5])} are "
            f"{params[not_float[0]].dtype}. Exclude them, or load the base model unquantised."
        )
    duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"selected_parameters lists {', '.join(duplicates)} more than once; list each tensor once.")


def canonical_name_map(model: nn.Module) -> dict[str, str]:
    """Every parameter name of ``model``, tied aliases included, mapped to the name ``model.named_parameters()`` lists
    it under (e.g. ``lm_head.weight`` of a tied model to ``model.embed_tokens.weight``). One walk of the model: build
    it once for many names."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}


def canonical_parameter_names(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Map names of tied parameters to their canonical names (:func:`canonical_name_map`), dropping repeats; unknown
    names pass through unchanged."""
    by_alias = canonical_name_map(model)
    out: dict[str, None] = {}
    for name in names:
        out[by_alias.get(name, name)] = None
    return list(out)
