"""Checks univ's transformer against PyTorch: loads a train_pair checkpoint into an
equivalent PyTorch model, runs the batch dump_step used, and compares logits, loss
and every parameter gradient (fp32: at most 1e-5 relative), model by model.

    python3 check_torch.py RUN_DIR DUMP_STEP [--device cpu|cuda] [--backend cpu|cuda]

--device is where PyTorch runs; --backend is univ's backend whose losses and gradients
are compared (logits always come from univ's CPU model).

Exit status 0 when everything agrees, 1 otherwise, 77 without torch."""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

try:
    import torch
    from torch import nn
    from safetensors.torch import load_file
except ImportError as error:
    print(f"skipped: torch and safetensors are needed ({error})")
    sys.exit(77)

TOLERANCE = 1e-5


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        C, D = c["d_model"], c["d_mlp"]
        self.heads = c["heads"]
        self.ln1 = nn.LayerNorm(C, eps=1e-5)
        self.qkv = nn.Linear(C, 3 * C)
        self.attn_proj = nn.Linear(C, C)
        self.ln2 = nn.LayerNorm(C, eps=1e-5)
        self.fc = nn.Linear(C, D)
        self.mlp_proj = nn.Linear(D, C)
        self.act = nn.ReLU() if c["activation"] == "relu" else nn.GELU()  # exact erf GELU

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        heads = lambda t: t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        q, k, v = heads(q), heads(k), heads(v)
        scores = q @ k.transpose(-2, -1) / math.sqrt(C // self.heads)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        y = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(self.act(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        V, T, C = c["vocab"], c["seq_len"], c["d_model"]
        self.wte = nn.Parameter(torch.empty(V, C))
        self.learned = c["pos"] == "learned"
        if self.learned:
            self.wpe = nn.Parameter(torch.empty(T, C))
        else:  # sin(t / 10000^(2i/C)) at 2i, cos at 2i+1, computed in float64
            t = torch.arange(T, dtype=torch.float64)[:, None]
            angle = t / torch.pow(10000.0, 2.0 * torch.arange(C // 2, dtype=torch.float64) / C)
            table = torch.stack([angle.sin(), angle.cos()], dim=2).reshape(T, C)
            self.register_buffer("table", table.float())
        self.blocks = nn.ModuleList(Block(c) for _ in range(c["layers"]))
        self.ln_f = nn.LayerNorm(C, eps=1e-5)
        self.lm_head = nn.Linear(C, V, bias=False)

    def forward(self, tokens):
        pos = self.wpe if self.learned else self.table
        x = self.wte[tokens] + pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def univ_parameters(self):
        """Our tensor names -> this model's parameters."""
        names = {"wte": self.wte, "ln_f.weight": self.ln_f.weight, "ln_f.bias": self.ln_f.bias,
                 "lm_head.weight": self.lm_head.weight}
        if self.learned:
            names["wpe"] = self.wpe
        for l, b in enumerate(self.blocks):
            for ours, theirs in (("ln1", b.ln1), ("attn.qkv", b.qkv), ("attn.proj", b.attn_proj), ("ln2", b.ln2),
                                 ("mlp.fc", b.fc), ("mlp.proj", b.mlp_proj)):
                names[f"blocks.{l}.{ours}.weight"] = theirs.weight
                names[f"blocks.{l}.{ours}.bias"] = theirs.bias
        return names


def relative(ours, theirs):
    return ((ours.double() - theirs.double()).norm() / theirs.double().norm().clamp_min(1e-30)).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a train_pair output directory")
    parser.add_argument("dump_step", help="the dump_step program")
    parser.add_argument("--device", default="cpu", help="where PyTorch runs")
    parser.add_argument("--backend", default="cpu", help="univ backend giving losses and gradients")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dump_path = os.path.join(tmp, "step.safetensors")
        subprocess.run([args.dump_step, args.run, dump_path, args.backend], check=True)
        dump = load_file(dump_path)
    worst, failures, models = 0.0, [], dump["loss"].shape[0]
    for m in range(models):
        weights = load_file(os.path.join(args.run, f"model_{m}.safetensors"))
        from safetensors import safe_open
        with safe_open(os.path.join(args.run, f"model_{m}.safetensors"), "pt") as f:
            config = json.loads(f.metadata()["univ.model"])
        model = GPT(config).to(args.device)
        params = model.univ_parameters()
        assert set(params) == set(weights), set(params) ^ set(weights)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])
        tokens = dump["inputs"][m].long().to(args.device)
        targets = dump["targets"][m].long().to(args.device)
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        checks = [("logits", relative(dump["logits"][m], logits.detach().cpu())),
                  ("loss", relative(dump["loss"][m:m + 1], loss.detach().cpu().reshape(1)))]
        checks += [(f"grad {name}", relative(dump[f"grad.{m}.{name}"], p.grad.cpu())) for name, p in params.items()]
        for what, err in checks:
            worst = max(worst, err)
            if not err <= TOLERANCE:
                failures.append(f"model {m} {what}: relative error {err:.2e}")
        print(f"model {m}: loss {loss.item():.6f} (univ {dump['loss'][m].item():.6f}); "
              f"largest relative error over logits, loss and {len(params)} gradients: "
              f"{max(e for _, e in checks):.2e}")
    for f in failures:
        print("MISMATCH", f)
    print(f"{'agree' if not failures else 'DISAGREE'}: worst relative error {worst:.2e} (tolerance {TOLERANCE:g})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
