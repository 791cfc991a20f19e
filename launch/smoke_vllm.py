"""GPU smoke test of everything the project asks of vLLM (`generation.vllm_smoke`, decision 71).

Run on a machine with a GPU, vLLM and local weights (not part of the test suite):

    python -m launch.smoke_vllm --small=/models/Qwen2.5-Math-1.5B-Instruct \\
        --large=/models/Qwen2.5-Math-7B-Instruct --prm=/models/Qwen2.5-Math-PRM-7B

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
flags.mark_flags_as_required(["small", "large"])


def main(argv):
    del argv

    table = vllm_smoke.run(_SMALL.value, _LARGE.value, _PRM.value,
                           mem=[float(m) for m in _MEM.value], prm_memory=_PRM_MEM.value,
                           max_model_len=_MAX_LEN.value, hf=_HF.value)
    text, fails = vllm_smoke.render(table)
    print("\n" + text)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    common.run(main)
