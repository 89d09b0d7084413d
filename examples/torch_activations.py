"""Worked example: two independently trained PyTorch models, their MLP activations
dumped to .npy, correlated by univ.

Trains two small next-token MLP models (embedding, two hidden ReLU layers) from
different seeds on different samples of one random Markov chain, hooks the output
of each hidden Linear layer (the neurons' pre-activations, univ's site `pre`) on
held-out tokens, and writes OUT/a.npy and OUT/b.npy shaped [tokens, 2 * hidden]
(layer 0's neurons, then layer 1's). Then:

    correlate --acts a=OUT/a.npy --acts b=OUT/b.npy --layers 2xHIDDEN --match max --out OUT/report

Needs torch and numpy. Any model works the same way: register a forward hook on the
modules whose outputs are the neurons, concatenate per token, save with numpy.
"""
import argparse
import os

import numpy as np
import torch
from torch import nn

VOCAB = 64


def markov_chain(rng):
    """Each token has 4 likely successors (90% of the mass) over a uniform floor."""
    p = np.full((VOCAB, VOCAB), 0.1 / VOCAB)
    for a in range(VOCAB):
        succ = rng.choice(VOCAB, 4, replace=False)
        p[a, succ] += 0.9 * rng.dirichlet(np.ones(4))
    return p


def sample(p, n, rng):
    tokens = np.empty(n, dtype=np.int64)
    tokens[0] = rng.integers(VOCAB)
    cumulative = p.cumsum(axis=1)
    for t in range(1, n):
        tokens[t] = min(np.searchsorted(cumulative[tokens[t - 1]], rng.random()), VOCAB - 1)
    return tokens


class NextToken(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 64)
        self.fc0 = nn.Linear(64, hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, VOCAB)

    def forward(self, x):
        h = torch.relu(self.fc0(self.embed(x)))
        h = torch.relu(self.fc1(h))
        return self.out(h)


def train(seed, tokens, hidden, steps):
    torch.manual_seed(seed)
    model = NextToken(hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(tokens[:-1]), torch.from_numpy(tokens[1:])
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(x), (512,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, loss.item()


@torch.no_grad()
def activations(model, tokens):
    """The outputs of fc0 and fc1 (pre-activations) for every token: [tokens, 2 * hidden]."""
    captured = []
    hooks = [m.register_forward_hook(lambda _m, _in, out: captured.append(out)) for m in (model.fc0, model.fc1)]
    model(torch.from_numpy(tokens))
    for h in hooks:
        h.remove()
    return torch.cat(captured, dim=1).numpy().astype(np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory for a.npy and b.npy")
    parser.add_argument("--hidden", type=int, default=128, help="neurons per hidden layer")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per model")
    parser.add_argument("--tokens", type=int, default=32000, help="held-out tokens to dump")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    chain = markov_chain(np.random.default_rng(0))  # one distribution
    held_out = sample(chain, args.tokens, np.random.default_rng(1))
    for name, seed in (("a", 10), ("b", 20)):  # own seed, own samples
        model, loss = train(seed, sample(chain, 200_000, np.random.default_rng(seed)), args.hidden, args.steps)
        acts = activations(model, held_out)
        np.save(os.path.join(args.out, f"{name}.npy"), acts)
        print(f"model {name}: final training loss {loss:.3f}; {acts.shape[0]} tokens x {acts.shape[1]} neurons "
              f"-> {os.path.join(args.out, name + '.npy')}")
    print(f"next: correlate --acts a={args.out}/a.npy --acts b={args.out}/b.npy --layers 2x{args.hidden} "
          f"--match max --out {args.out}/report")


if __name__ == "__main__":
    main()
