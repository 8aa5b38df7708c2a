"""GPU check of the DFM model: bf16 forward+backward throughput and MFU, same run.

Builds ``OmniModel`` from a preset (default ``1b5``, random init), casts it to bf16 on CUDA,
and times DFM training micro-batches at ``--seq-len`` (default 2048): masked-path corruption
of the response (the second half of each row; the first half is the clean instruction),
the forward pass, the text head's logits at the corrupted positions only, the summed
cross-entropy and the backward pass. No optimizer step: the figure is the model's.

FLOPs counted per micro-batch (the usual dense-transformer estimate, Kaplan et al. 2020 /
PaLM appendix B, forward + backward = 3 x forward):

    6 * N * tokens                       N = backbone matmul weights (no embeddings, no heads)
    + 6 * 2 * n_layers * seq * d_model * tokens    attention scores and values (QK^T and AV:
                                         2 matmuls of 2*seq*d flops per token, bidirectional
                                         so the full seq x seq square is counted)
    + 6 * d_model * V_head * positions   the head's logits where the loss needs them

MFU = counted FLOPs / seconds / peak, with ``--peak-tflops`` (default 989, the H100/H200 SXM
dense bf16 datasheet figure). The attention kernel is flash-attn 2 when importable, else
torch SDPA (its flash backend when no mask is needed), as ``ModelConfig.attention="auto"``
picks. Writes ``benchmarks/results/gpu_check.json``.

    python benchmarks/gpu_check.py [--preset 1b5] [--seq-len 2048] [--batch 4] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tokenization.vocab import VocabLayout
from training.dfm import MaskedPath, PolynomialScheduler, VocabGroups
from training.model import OmniModel
from training.model_config import load_model_config

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
# Qwen2.5's BPE size for text, one 16k image codebook, one 4k audio codebook.
LAYOUT = VocabLayout(text_size=151_643, image_size=16_384, audio_size=4_096)


def backbone_matmul_params(model: OmniModel) -> int:
    """Weights of the transformer layers' linear maps (what 6*N*tokens counts)."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if ".layers." in f".{name}" and p.dim() == 2
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1b5")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs CUDA (or --device cpu for a smoke run)")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)

    # Activations of one micro-batch fit in GPU memory: no recompute, so model FLOPs = work done.
    config = load_model_config(args.preset, ("gradient_checkpointing=false",))
    codebooks = {m: torch.randn(LAYOUT.sizes[m], 8) for m in ("image", "audio")}
    model = OmniModel(config, LAYOUT, codebooks).to(device=device, dtype=torch.bfloat16)
    model.train()
    hidden = model.config.backbone.hidden_size
    layers = model.config.backbone.num_hidden_layers
    text_group = LAYOUT.sizes["text"] + LAYOUT.sizes["special"]

    groups = VocabGroups.from_layout(LAYOUT)
    path = MaskedPath(PolynomialScheduler(1), groups, LAYOUT.special_id("<MASK>"))
    batch, seq = args.batch, args.seq_len
    x1 = torch.randint(0, LAYOUT.text_size, (batch, seq), device=device)
    response = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    response[:, seq // 2 :] = True
    instruction_lengths = torch.full((batch,), seq // 2, device=device)

    def step(split: bool) -> int:
        t = torch.rand(batch, device=device)
        xt = path.sample(x1, t, response)
        where = path.loss_mask(xt, x1, response)
        states = model(xt, instruction_lengths=instruction_lengths if split else None)
        logits = model.head_logits(states[where], "text")
        loss = torch.nn.functional.cross_entropy(logits.float(), x1[where], reduction="sum")
        loss.backward()
        model.zero_grad(set_to_none=True)
        return int(where.sum())

    def timed(split: bool) -> tuple[float, int]:
        for _ in range(args.warmup):
            step(split)
        if cuda:
            torch.cuda.synchronize()
        positions = 0
        started = time.perf_counter()
        for _ in range(args.steps):
            positions += step(split)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started, positions

    # Unsplit: plain bidirectional attention (no mask: SDPA's flash backend); split: the
    # instruction/response mask of DFM training (a boolean mask: SDPA's efficient backend).
    unsplit_seconds, _ = timed(split=False)
    seconds, positions = timed(split=True)

    tokens = batch * seq * args.steps
    n = backbone_matmul_params(model)
    flops = (
        6 * n * tokens
        + 6 * 2 * layers * seq * hidden * tokens
        + 6 * hidden * text_group * positions
    )
    tflops = flops / seconds / 1e12
    result = {
        "name": "gpu_check_train_step",
        "unit": "tokens/s",
        "value": round(tokens / seconds, 1),
        "baseline": round(args.peak_tflops * 1e12 / (flops / tokens), 1),
        "ratio": round(tflops / args.peak_tflops, 4),
        "target": None,
        "mfu": round(tflops / args.peak_tflops, 4),
        "achieved_tflops": round(tflops, 1),
        "peak_tflops": args.peak_tflops,
        "baseline_description": "tokens/s at 100% MFU under the same FLOP count",
        "flop_formula": "6*N*tokens + 12*layers*seq*d_model*tokens + 6*d_model*V_text*positions",
        "backbone_matmul_params": n,
        "total_params": sum(p.numel() for p in model.parameters()),
        "preset": args.preset,
        "seq_len": seq,
        "batch": batch,
        "steps": args.steps,
        "attention": str(model.backend),
        "no_instruction_mask_tokens_per_s": round(tokens / unsplit_seconds, 1),
        "no_instruction_mask_mfu": round(flops / unsplit_seconds / 1e12 / args.peak_tflops, 4),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
        "torch": torch.__version__,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
