"""The PyTorch peers of `train_throughput.py`, trained as `tfglm.training.trainer.compile_model` trains, without
TensorFlow: Hugging Face transformers' `GPT2LMHeadModel` (random init) and nanoGPT's model (`torch_gpt.py`), eager, on
the CPU, torch's default thread count.

One step = forward, next-token cross-entropy over every position (the mean), backward, global-norm clipping at
`grad_clip`, AdamW (`beta_1`, `beta_2`, epsilon 1e-7 as Keras's, decoupled `weight_decay` on every matrix and
embedding, none on biases and norms, as tfglm excludes `bias`, `gamma` and `beta`) at the learning rate of tfglm's
schedule (linear warmup from 0, then cosine to `min_learning_rate` at `steps`).

As a script it is the PyTorch peers' worker process (`bench/workers.py`) for `train_throughput.py`: it imports
torch (and, for `hf_torch`, transformers), loads the batches the parent saved, builds one model and trains the steps
it is asked for. TensorFlow is never imported, so the timings and the peak RSS are the PyTorch stack's own.

    python -m bench.speed.torch_train KIND BATCHES.npz CONFIG.yaml [OVERRIDE ...]
"""

import importlib
import math
import sys

from bench import extra, workers

extra.require("torch")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.speed.torch_gpt import GPT  # noqa: E402
from tfglm.config import load_config  # noqa: E402  (no TensorFlow)

KINDS = ("hf_torch", "nanogpt_torch")


def lr_factor(train):
    """The multiple of `learning_rate` at each step: Keras's CosineDecay with warmup, as tfglm's schedule."""
    warmup, decay, alpha = train.warmup_steps, train.steps - train.warmup_steps, \
        train.min_learning_rate / train.learning_rate

    def factor(step):
        if step < warmup:
            return step / warmup
        cosine = 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))
        return (1 - alpha) * cosine + alpha

    return factor


class Trainer:
    """One PyTorch peer at a tfglm config (`tfglm.config.load_config`'s: the model's shape, the training settings),
    cycling over the batches x, y ([count, batch, length] integer arrays)."""

    def __init__(self, kind, config, vocab_size, x, y):
        m, train = config.model, config.train
        torch.manual_seed(train.seed)
        layers, heads, width, context = m.num_layers, m.num_heads, m.hidden_dim, m.max_length
        if kind == "hf_torch":
            # Imported for this kind only, so that the nanoGPT-style worker's memory is PyTorch's alone.
            from transformers import GPT2Config, GPT2LMHeadModel

            config = GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=width, n_layer=layers,
                                n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                bos_token_id=None, eos_token_id=None)  # GPT-2's 50,256 lies outside a char vocab
            self.model = GPT2LMHeadModel(config)  # n_inner None: 4 x width; tie_word_embeddings True
            self.forward = lambda ids: self.model(input_ids=ids, use_cache=False).logits
            self.attention = self.model.config._attn_implementation
            position = self.model.transformer.wpe.weight.numel()
        else:
            self.model = GPT(vocab_size, layers, heads, width, context)
            self.forward = self.model
            self.attention = "F.scaled_dot_product_attention"
            position = self.model.wpe.weight.numel()
        self.model.train()
        self.params = list(self.model.parameters())  # a tied weight once
        self.params_no_pos = sum(p.numel() for p in self.params) - position
        groups = [{"params": [p for p in self.params if p.dim() >= 2], "weight_decay": train.weight_decay},
                  {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=train.learning_rate, betas=(train.beta_1, train.beta_2),
                                           eps=1e-7)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(train))
        self.clip = train.grad_clip
        self.x, self.y = torch.from_numpy(np.asarray(x, np.int64)), torch.from_numpy(np.asarray(y, np.int64))
        self.position = 0

    def fit(self, steps):
        """Trains `steps` steps; returns the last loss."""
        for _ in range(steps):
            i = self.position % len(self.x)
            self.position += 1
            logits = self.forward(self.x[i])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.y[i].reshape(-1))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            self.optimizer.step()
            self.schedule.step()
        return loss.item()


def main():
    if len(sys.argv) < 4 or sys.argv[1] not in KINDS:
        sys.exit(f"usage: python -m bench.speed.torch_train {{{','.join(KINDS)}}} BATCHES.npz CONFIG.yaml "
                 "[OVERRIDE ...]")
    kind, batches, config_file, *overrides = sys.argv[1:]
    data = np.load(batches)
    config = load_config(config_file, overrides)
    if kind == "hf_torch":  # loaded before the baseline, as the TensorFlow workers have KerasHub loaded
        extra.require("transformers")
        importlib.import_module("transformers.models.gpt2.modeling_gpt2")
    rss_before = workers.peak_rss_mb()
    trainer = Trainer(kind, config, int(data["vocab"]), data["x"], data["y"])
    workers.serve(trainer.fit, {"rss_before_model_mb": rss_before, "params_no_pos": trainer.params_no_pos,
                                "attention": trainer.attention, "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
