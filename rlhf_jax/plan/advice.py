"""Which switch would make a stage fit, and by how much each would lower its peak.

Every estimate is arithmetic on the planned parts (nothing is compiled again), program by
program: a switch may shrink the update's peak and leave sampling's, so the stage's new peak
is the largest of its programs' new peaks. A switch changes a program's peak in two ways:
weights that live through the stage (`resident`: weights, moments, EMA, frozen copies), and,
in a training program, the temporaries. A training program's temporaries peak either in the
backward (activations, gradients, logits) or in the optimizer update (gradients and Adam's
temporaries: the stage's `floor`, compiled alone by the planner); an activation switch lowers
only the first, never below the floor. Formulas and how close they came to recompiling with
the switch: docs/memory.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from rlhf_jax.config import Config
from rlhf_jax.loops.build import Forward
from rlhf_jax.models import ModelConfig
from rlhf_jax.models.attention import resolve
from rlhf_jax.models.token_stats import logits_chunk
from rlhf_jax.plan.planner import ProgramPlan, StagePlan
from rlhf_jax.sharding import data_parallel_size

LORA_RANK = 16
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
WEIGHT_PARTS = ("params", "optimizer", "ema", "frozen", "kept_weights")


@dataclasses.dataclass
class Suggestion:
    switch: str  # the key=value override(s)
    saves: int  # bytes off the stage's peak, per device
    peak: int  # the stage's peak with the switch
    fits: bool
    note: str

    def to_dict(self) -> dict:
        return {
            "switch": self.switch,
            "saves_bytes": self.saves,
            "peak_bytes_per_device": self.peak,
            "fits": self.fits,
            "note": self.note,
        }


@dataclasses.dataclass(frozen=True)
class Context:
    cfg: Config
    runtime: object  # loops.runtime.Runtime
    device_memory: int


@dataclasses.dataclass(frozen=True)
class Effect:
    """What a switch does to every program: `resident` bytes saved; in training programs,
    `backward` bytes off the backward's temporaries (negative: more) and the floor scaled by
    `floor_scale`."""

    resident: float = 0.0
    backward: float = 0.0
    floor_scale: float = 1.0
    experience_keep: float = 1.0  # the fraction left of the experience forwards' temporaries
    sampler: float = 0.0  # bytes off the sampler's temporaries


EXPERIENCE_PROGRAMS = ("experience", "finish")
SAMPLING_PROGRAMS = ("experience", "sample")


def _itemsize(m: ModelConfig) -> int:
    return 2 if m.dtype == "bfloat16" else 4


def lora_fraction(model: ModelConfig, rank: int = LORA_RANK, targets=ALL_TARGETS) -> float:
    """Adapter parameters / model parameters: per layer and projection, rank x (in + out)."""
    d, h, k, e, f = model.d_model, model.n_heads, model.n_kv_heads, model.head_dim, model.mlp_dim
    sizes = {
        "q": d + h * e,
        "k": d + k * e,
        "v": d + k * e,
        "o": h * e + d,
        "gate": (d + f) if model.gated_mlp else 0,
        "up": d + f,
        "down": f + d,
    }
    adapters = model.n_layers * rank * sum(sizes[t] for t in targets)
    layer = d * (h + 2 * k) * e + h * e * d + (3 if model.gated_mlp else 2) * d * f
    embed = model.vocab_size * d * (1 if model.tie_embeddings else 2)
    return adapters / (model.n_layers * layer + embed)


def logits_bytes(fw: Forward, rows: float) -> float:
    """Float32 logits and one more buffer of their size (their gradient in a backward, the
    exponentials in a forward), or a chunk's when `model.logits_chunk` chunks the head."""
    if not fw.logits:
        return 0.0
    positions = logits_chunk(fw.model, max(int(rows), 1), fw.logits) or fw.logits
    return 2 * rows * positions * fw.model.vocab_size * 4


def inference_bytes(fw: Forward, rows: float) -> float:
    """Temporaries of a forward without backward over `rows` rows: its logits and one
    layer's widest activations (the MLP's, or the attention scores in float32)."""
    m, length = fw.model, fw.length
    widest = max(
        (2 if m.gated_mlp else 1) * m.mlp_dim, 2 * (m.n_heads + 2 * m.n_kv_heads) * m.head_dim
    )
    layer = rows * length * (widest + 2 * m.d_model) * _itemsize(m)
    return logits_bytes(fw, rows) + layer + rows * m.n_heads * length * length * 4


def residual_bytes(fw: Forward, rows: float, remat: bool) -> float:
    """What a layer scan keeps for its backward, for `rows` rows on one device. remat off
    (`dots_saveable`): every matmul output (q, k, v, the attention scores in float32 on the
    dense path and its output, o, the MLP's) per layer; remat on: each layer's input only."""
    m = fw.model
    tokens = rows * fw.length
    if remat:
        return m.n_layers * tokens * m.d_model * _itemsize(m)
    width = 2 * m.n_heads * m.head_dim + 2 * m.n_kv_heads * m.head_dim + 2 * m.d_model
    width += (2 if m.gated_mlp else 1) * m.mlp_dim
    # The dense path's f32 scores are a saved matmul output; the blocked, cuDNN and splash
    # paths keep only their output and a log-sum-exp per query.
    dense = resolve(m.attention, m.compute_dtype, m.head_dim, fw.length, False) == "dense"
    scores = rows * m.n_heads * fw.length * (fw.length if dense else 1) * 4
    return m.n_layers * (tokens * width * _itemsize(m) + scores)


def lora_residuals(fw: Forward, rows: float) -> float:
    """What adapters add to a layer scan's residuals under `dots_saveable`: an adapted
    projection's output is the sum of two matmuls, and the backward recomputes the sum from
    both saved products, so the adapter's [tokens, out] product is kept too."""
    m = fw.model
    h, k, e, d, f = m.n_heads, m.n_kv_heads, m.head_dim, m.d_model, m.mlp_dim
    widths = h * e + 2 * k * e + 2 * d + (2 if m.gated_mlp else 1) * f
    return m.n_layers * rows * fw.length * widths * _itemsize(m)


def _micro_rows(fw: Forward, ctx: Context, grad_accum: int) -> float:
    return fw.rows / grad_accum / data_parallel_size(ctx.runtime.mesh, ctx.runtime.rules)


def _part(stage: StagePlan, key: str) -> int:
    return stage.build.detail.get(key, 0)


def _training(stage: StagePlan, p: ProgramPlan) -> bool:
    return next(x.training for x in stage.build.program_list if x.name == p.name)


def _bound(stage: StagePlan, p: ProgramPlan, ctx: Context) -> tuple[float, float]:
    """`(backward temporaries, optimizer-phase temporaries)` of a training program. When the
    backward's exceed the optimizer floor, they are the program's temporaries; when the
    optimizer update sets the peak (its temporaries are the program's), the backward's lie
    hidden below and are estimated: gradients + residuals + logits, at most that."""
    act = p.parts["activations"]
    if act > 1.05 * stage.floor:
        return act, stage.floor
    return min(act, p.parts["params"] + _micro_batch_bytes(stage, ctx)), act


def _micro_batch_bytes(stage: StagePlan, ctx: Context) -> float:
    """A micro-batch's residuals and logits, estimated from the model's shape."""
    facts = stage.build.facts
    total = 0.0
    for fw in facts["forwards"]:
        rows = _micro_rows(fw, ctx, facts["grad_accum"])
        total += residual_bytes(fw, rows, fw.model.remat) + logits_bytes(fw, rows)
    return total


def new_peak(stage: StagePlan, p: ProgramPlan, e: Effect, ctx: Context) -> float:
    """Program `p`'s peak under the switch's effect."""
    peak = p.peak - e.resident
    if not _training(stage, p):
        if p.name not in EXPERIENCE_PROGRAMS + SAMPLING_PROGRAMS:
            return peak
        # The program's temporaries are the larger phase's: a switch that shrinks one phase
        # lowers them only as far as the other phase allows, and never takes the KV cache.
        sampling, forwards = experience_phases(stage, p, ctx)
        kv = p.parts["kv_cache"] if sampling else 0.0
        after = max(max(sampling - e.sampler, kv), forwards * e.experience_keep)
        saved = max(sampling, forwards) - after
        return peak - min(max(saved, 0.0), p.parts["activations"])
    backward, optimizer = _bound(stage, p, ctx)
    after = max(backward - e.backward, optimizer * e.floor_scale)
    return peak - p.parts["activations"] + after


def _lora(stage: StagePlan, ctx: Context) -> tuple[str, Effect, str] | None:
    facts = stage.build.facts
    model = facts["model"]
    if model is None or facts["lora_on"]:
        return None
    trained = [fw for fw in facts["forwards"] if fw.model == facts["forwards"][0].model]
    keep = lora_fraction(trained[0].model)
    params = _part(stage, f"params/{model}")
    resident = (1 - keep) * (_part(stage, f"optimizer/{model}") + _part(stage, f"ema/{model}"))
    # RL: the policy's weights become the adapters (the base is the reference already, or the
    # SFT weights the loop keeps anyway). Supervised stages: the loop copies the base into
    # the state beside the starting weights it keeps, so the weights cost as much as before.
    resident += (1 - keep) * params if stage.name == "ppo" else -keep * params
    ga = facts["grad_accum"]
    extra = sum(lora_residuals(fw, _micro_rows(fw, ctx, ga)) for fw in trained)
    total = sum(p for k, p in stage.build.detail.items() if k.startswith("params/"))
    floor_scale = (total - (1 - keep) * params) / total if total else 1.0
    effect = Effect(resident, (1 - keep) * params - extra, floor_scale)
    models = "" if model == "policy" else f" lora.models=[policy,{model}]"
    note = (
        f"rank-{LORA_RANK} adapters on every projection train {100 * keep:.2f}% of the "
        f"{model}'s weights: its Adam moments and gradients shrink to theirs"
    )
    return f"lora.rank={LORA_RANK}{models}", effect, note


def _shared_trunk(stage: StagePlan, ctx: Context):
    if not stage.build.facts.get("critic"):
        return None
    if getattr(ctx.cfg.ppo, "critic", None) == "shared_trunk":
        return None
    critic, policy = _part(stage, "params/critic"), _part(stage, "params/policy")
    effect = Effect(critic + _part(stage, "optimizer/critic"), critic, policy / (policy + critic))
    note = "a value head on the policy's trunk: no critic weights, moments or gradients"
    return "ppo.critic=shared_trunk", effect, note


def _bf16(stage: StagePlan, ctx: Context):
    if ctx.cfg.model.param_dtype != "float32":
        return None
    p = stage.programs[0].parts
    weights = sum(p[k] for k in WEIGHT_PARTS)
    # The backward keeps its size: compute stays in model.dtype, on float32 copies of the
    # weights when that is float32.
    note = "bf16 storage halves the weights, Adam moments and frozen copies"
    return "model.param_dtype=bfloat16", Effect(weights / 2, 0.0, 0.5), note


def _optim(cfg: Config, section: str):
    """The OptimConfig at a dotted config path, e.g. "ppo.policy_optim"."""
    obj = cfg
    for attr in section.split("."):
        obj = getattr(obj, attr)
    return obj


def _mu_bf16(stage: StagePlan, ctx: Context):
    """Adam's first moment in bf16: 2 of its 8 bytes per float32 trained weight."""
    facts = stage.build.facts
    sections = [facts["accum_key"].removesuffix(".grad_accum")]  # e.g. "sft.optim"
    if facts.get("critic"):
        sections.append("ppo.value_optim")
    weights = sum(v for k, v in stage.build.detail.items() if k.startswith("params/"))
    if ctx.cfg.model.param_dtype != "float32" or not weights:
        return None
    if any(_optim(ctx.cfg, name).mu_dtype == "bfloat16" for name in sections):
        return None
    switch = " ".join(f"{name}.mu_dtype=bfloat16" for name in sections)
    note = "Adam's first moment stored in bf16 (the second stays float32)"
    return switch, Effect(weights / 4), note


def _remat(stage: StagePlan, ctx: Context):
    facts = stage.build.facts
    if all(fw.model.remat for fw in facts["forwards"]):
        return None
    saved = 0.0
    for fw in facts["forwards"]:
        if not fw.model.remat:
            rows = _micro_rows(fw, ctx, facts["grad_accum"])
            saved += residual_bytes(fw, rows, False) - residual_bytes(fw, rows, True)
    note = "recompute each layer in the backward instead of keeping its matmul outputs"
    return "model.remat=true", Effect(backward=saved), note


def _grad_accum(stage: StagePlan, ctx: Context):
    """More micro-batches per update: the smallest power-of-two factor (up to 8) that makes
    the stage fit, else the largest the batch allows (for `together`).

    What a micro-batch's rows cost is read off the compiled backward: its temporaries less
    the gradients (and, from two micro-batches on, their accumulator), which scale with the
    rows. The shape estimate (residuals + logits) stays a lower bound: at long lengths it
    misses most of a recomputing backward (a 1B PPO update at 4k + 4k: 67.6 GiB per
    micro-batch measured, and the old estimate offered grad_accum=4 at 89.7 GiB where planning
    again gave 77.0, docs/memory.md)."""
    facts = stage.build.facts
    ga, batch = facts["grad_accum"], facts["batch_size"]
    dp = data_parallel_size(ctx.runtime.mesh, ctx.runtime.rules)
    trainers = [p for p in stage.programs if _training(stage, p)]
    if not trainers:
        return None
    grads = max(p.parts["params"] for p in trainers)
    backward = max(_bound(stage, p, ctx)[0] for p in trainers)
    per_micro = max(backward - grads * (1 if ga == 1 else 2), _micro_batch_bytes(stage, ctx))
    found = None
    for factor in (2, 4, 8):
        new = ga * factor
        if batch % new or (batch // new) % dp:
            break
        # From one micro-batch to several, a gradient accumulator joins the scan's carry.
        extra = grads if ga == 1 else 0
        effect = Effect(backward=per_micro * (1 - 1 / factor) - extra)
        note = f"{new} micro-batches of {batch // new} per update (the same update)"
        found = (f"{facts['accum_key']}={new}", effect, note)
        peak = max(new_peak(stage, p, effect, ctx) for p in stage.programs)
        if peak <= ctx.device_memory:
            break
    return found


def _fsdp(stage: StagePlan, ctx: Context):
    mesh = ctx.runtime.mesh
    target, current = mesh.size // mesh.shape["tensor"], mesh.shape["fsdp"]
    if target <= current:
        return None
    cut = 1 - current / target
    p = stage.programs[0].parts
    weights = sum(p[k] for k in WEIGHT_PARTS)
    effect = Effect(cut * weights, cut * p["params"], current / target)
    note = f"weights, moments and gradients split {target} ways instead of {current}"
    return f"mesh.fsdp={target} mesh.data=1", effect, note


def _experience_micro_batch(stage: StagePlan, ctx: Context):
    """The experience's forwards a micro-batch at a time: the smallest of 1/8, 1/4, 1/2 of
    the rollout batch that the data-parallel devices divide. The forwards' temporaries
    shrink with their rows; the sampler's stay (`new_peak` floors the program at them: at
    8B, 1k + 1k, without that floor the advice promised 17.9 GiB and the compile gave
    1.25)."""
    forwards = stage.build.facts.get("experience")
    if not forwards or getattr(ctx.cfg.ppo, "experience_micro_batch", 0):
        return None
    b, dp = forwards[0].rows, data_parallel_size(ctx.runtime.mesh, ctx.runtime.rules)
    rows = next((b // n for n in (8, 4, 2) if b % n == 0 and (b // n) % dp == 0), 0)
    if not rows:
        return None
    keep = forwards_bytes(forwards, rows / dp) / forwards_bytes(forwards, b / dp)
    note = (
        f"the reference, reward and critic forwards {rows} responses at a time instead of "
        f"all {b} (the same experience)"
    )
    return f"ppo.experience_micro_batch={rows}", Effect(experience_keep=keep), note


def forwards_bytes(forwards, rows: float) -> float:
    """The experience forwards' temporaries at `rows` rows per device (one at a time)."""
    return max(inference_bytes(fw, rows) for fw in forwards)


def experience_phases(stage: StagePlan, p: ProgramPlan, ctx: Context) -> tuple[float, float]:
    """`(sampling, forwards)`: the temporaries of program `p`'s sampling (its KV cache
    included) and of its experience forwards (reference, reward, critic). A program that is
    one phase is measured whole. The fused experience program runs both, one after the
    other (the cache is gone by the forwards), so its temporaries are the larger: split by
    its phases compiled alone where the planner compiled them (for the stage's peak
    program), else by the estimates: the sampler's (`sampler_bytes`) and, when that reaches
    the program's, the forwards' at the configured micro-batch."""
    temp = float(p.parts["kv_cache"] + p.parts["activations"])
    facts = stage.build.facts
    if p.name not in SAMPLING_PROGRAMS or facts.get("sampler") is None:
        return 0.0, temp
    if p.name not in EXPERIENCE_PROGRAMS:
        return temp, 0.0
    if p.phases:
        return float(p.phases["sample"]), float(p.phases["finish"])
    sampling = min(sampler_bytes(stage, ctx), temp)
    if sampling < temp or not facts.get("experience"):
        return sampling, temp
    dp = data_parallel_size(ctx.runtime.mesh, ctx.runtime.rules)
    rows = getattr(ctx.cfg.ppo, "experience_micro_batch", 0) or facts["experience"][0].rows
    return temp, min(forwards_bytes(facts["experience"], rows / dp), temp)


def layer_weight_bytes(m: ModelConfig) -> float:
    """The layers' weights (the stacked `layers` leaves, adapters aside) in storage dtype."""
    d, h, k, e, f = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim
    layer = d * (h + 2 * k) * e + h * e * d + (3 if m.gated_mlp else 2) * d * f
    return m.n_layers * layer * (2 if m.param_dtype == "bfloat16" else 4)


def sampler_bytes(stage: StagePlan, ctx: Context) -> float:
    """The sampler's temporaries, estimated: its KV cache, the per-layer copy of the
    weights the unrolled decode path makes for each call, and the prefill's widest
    activations (one forward over the prompts)."""
    facts = stage.build.facts
    fw = facts["sampler"]
    program = next(p for p in stage.programs if p.name in ("experience", "sample"))
    dp = data_parallel_size(ctx.runtime.mesh, ctx.runtime.rules)
    copy = 0.0 if facts["decode_layer_scan"] else layer_weight_bytes(fw.model)
    return program.parts["kv_cache"] + copy + inference_bytes(fw, fw.rows / dp)


def _decode_layer_scan(stage: StagePlan, ctx: Context):
    """The sampler as a scan over the stacked layers: no per-call copy of every layer's
    weights (`rollout.generate(layer_scan=True)`)."""
    facts = stage.build.facts
    if facts.get("sampler") is None or facts["decode_layer_scan"]:
        return None
    if not any(p.name in ("experience", "sample") for p in stage.programs):
        return None
    saved = layer_weight_bytes(facts["sampler"].model)
    note = (
        "the sampler scans the stacked layers instead of copying every layer's weights for "
        "each call (same tokens; slower decode steps: 2.1x on an H200, ~4x on XLA:CPU)"
    )
    return "ppo.decode_layer_scan=true", Effect(sampler=saved), note


def _no_ema(stage: StagePlan, ctx: Context):
    ema = _part(stage, "ema/policy")
    if not ema:
        return None
    note = "no EMA copy of the policy (it serves evaluation only)"
    return "ppo.ema_decay=0", Effect(ema), note


# Not among them: model.frozen_dtype=bfloat16. As the RL loop places the frozen models today
# (`loops.build_rl.place_frozen`), their bf16 copies join the float32 originals it keeps, which
# raises the peak by half the frozen models (docs/memory.md).
SWITCHES: tuple[Callable, ...] = (
    _lora,
    _shared_trunk,
    _bf16,
    _mu_bf16,
    _remat,
    _grad_accum,
    _fsdp,
    _experience_micro_batch,
    _decode_layer_scan,
    _no_ema,
)


def _missing_key(cfg: Config, switch: str) -> bool:
    """Whether a switch names a config key this version's schema does not have yet."""
    section, _, rest = switch.split("=")[0].partition(".")
    obj = getattr(cfg, section, None)
    for name in rest.split("."):
        if obj is None or not hasattr(obj, name):
            return True
        obj = getattr(obj, name)
    return False


def _candidates(stage: StagePlan, ctx: Context) -> list[tuple[str, Effect, str, int]]:
    """`(switch, effect, note, new stage peak)` of every switch worth a line."""
    out = []
    for make in SWITCHES:
        found = make(stage, ctx)
        if found is None:
            continue
        switch, effect, note = found
        peak = int(max(new_peak(stage, p, effect, ctx) for p in stage.programs))
        if stage.peak - peak < max(2**20, stage.peak // 200):  # nothing worth a line
            continue
        out.append((switch, effect, note, peak))
    return out


def suggestions(stage: StagePlan, ctx: Context) -> list[Suggestion]:
    """Every switch that lowers the stage's peak, most bytes saved first."""
    out = []
    for switch, _, note, peak in _candidates(stage, ctx):
        if _missing_key(ctx.cfg, switch):
            note += " (key not in this version's config yet)"
        out.append(Suggestion(switch, stage.peak - peak, peak, peak <= ctx.device_memory, note))
    return sorted(out, key=lambda s: -s.saves)


# Switches that shrink the same bytes (the trained weights' moments): estimated together, their
# savings would be counted twice, so a combination takes at most one of them.
_OVERLAPPING = ("lora.rank=", "model.param_dtype=", ".mu_dtype=")


def _combine(a: Effect, b: Effect, backward: float) -> Effect:
    """Both switches' effects. Their savings on the backward's `backward` bytes compose as
    fractions (remat, then half the micro-batch: half of what remat leaves), not as a sum,
    which would count the bytes both remove twice."""
    keep = 1.0
    for e in (a, b):
        keep *= 1 - min(e.backward / backward, 1.0) if backward > 0 else 1.0
    return Effect(
        a.resident + b.resident,
        backward * (1 - keep) if backward > 0 else a.backward + b.backward,
        a.floor_scale * b.floor_scale,
        a.experience_keep * b.experience_keep,
        a.sampler + b.sampler,
    )


def together(stage: StagePlan, ctx: Context) -> Suggestion | None:
    """When the stage does not fit and no single switch makes it fit: the switches that do
    together, taken greedily, most bytes saved first (all of them when even they do not),
    their effects added. None when the stage fits or one switch suffices."""
    found = sorted(_candidates(stage, ctx), key=lambda c: c[3])
    if stage.peak <= ctx.device_memory or not found or found[0][3] <= ctx.device_memory:
        return None
    chosen: list[str] = []
    effect, peak = Effect(), stage.peak
    trainers = [p for p in stage.programs if _training(stage, p)]
    backward = max((_bound(stage, p, ctx)[0] for p in trainers), default=0.0)
    for switch, e, _, _ in found:
        if any(k in switch for k in _OVERLAPPING) and any(
            k in c for c in chosen for k in _OVERLAPPING
        ):
            continue
        chosen.append(switch)
        effect = _combine(effect, e, backward)
        peak = int(max(new_peak(stage, p, effect, ctx) for p in stage.programs))
        if peak <= ctx.device_memory:
            break
    if len(chosen) < 2:
        return None
    note = "these switches together (their estimates added; plan again with them to check)"
    return Suggestion(" ".join(chosen), stage.peak - peak, peak, peak <= ctx.device_memory, note)


def largest_part(parts: dict[str, int]) -> str:
    return max(parts, key=lambda k: parts[k])
