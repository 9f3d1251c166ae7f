"""The baseline for export benchmarks: a plain `torch.onnx.export(dynamo=True)` and save of a model
directory, as a user would write it (float32, eager attention, dynamic batch and sequence).

    python bench/plain_export.py MODEL_DIR OUT.onnx
"""

import sys

import torch
from transformers import AutoModelForCausalLM


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def main(model_dir: str, out: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    model.config.use_cache = False
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    with torch.no_grad():
        program = torch.onnx.export(Logits(model), (ids, torch.ones_like(ids)), dynamo=True, opset_version=18,
                                    input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                    dynamic_shapes=shapes)
    program.save(out, external_data=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
