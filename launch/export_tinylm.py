"""Write the embedded tiny models as Hugging Face model folders that `transformers` and a real
vLLM engine load (decision 85): small and large as `Qwen2ForCausalLM`, the PRM stand-in as
`Qwen2ForProcessRewardModel`, each with config.json, model.safetensors and a tokenizer built
offline (with its chat template). Deterministic: the same weights give the same bytes.

    python -m launch.export_tinylm --out=runs/models     # runs/models/{small,large,prm}
"""

from __future__ import annotations

from absl import flags

from generation.tinylm import hf_export
from launch import common

_OUT = flags.DEFINE_string("out", "runs/models", "Folder to write small/, large/ and prm/ into.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out folder (it is "
                                "written afresh, never merged).")
_WEIGHTS = flags.DEFINE_string("weights", None, "Tiny-model weights folder (default: the "
                               "committed ones).")


def main(argv):
    del argv
    for name, path in hf_export.export_all(_OUT.value, _WEIGHTS.value,
                                                   overwrite=_OVERWRITE.value).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    common.run(main)
