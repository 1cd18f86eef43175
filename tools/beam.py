"""
Beam search, beside the core: transformers' beam search (do_sample=False) as a chooser of generate.py's one decode
loop, every beam with its own KV-cache rows and its own pruning state, so that each beam prunes by its own attention.

    python generate.py --image photo.jpg --num-beams 3 --num-return-sequences 2 --method fastv
    out = beam.generate(model, tok, images, prompts, max_new_tokens=32, num_beams=3, rule="fastv")
"""
import math

import torch

import dyrate
import generate as core
from tools import fast


def check_options(num_beams, num_return_sequences, length_penalty, temperature=0.0):
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a whole number >= 1 (1: greedy or sampling), got {num_beams!r}.")
    if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int) or \
            not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must lie in [1, num_beams={num_beams}], got {num_return_sequences!r}.")
    if not (isinstance(length_penalty, (int, float)) and math.isfinite(length_penalty)):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}.")
    if num_beams > 1 and temperature > 0:
        raise ValueError("beam search ranks beams by their log-probabilities (transformers' do_sample=False): use "
                         "temperature 0 with num_beams > 1.")


class BeamSearch:
    """transformers' beam search (do_sample=False: beams ranked by their summed token log-probabilities, finished
    hypotheses kept with a length penalty, early_stopping=False) as the chooser of the one decode loop. Sample b's
    beams are rows b*N .. b*N+N-1 of the batch, each with its own KV-cache rows and its own pruning state: after each
    step a beam takes its parent's rows (select_rows: only the rows that change are copied), so every beam prunes by
    its own attention. Finished hypotheses keep their tokens, scores and pruning history (Pruner.lineage)."""

    def __init__(self, batch, num_beams, n_new, eos_id, caches, pruner, length_penalty=1.0):
        B, N, dev = batch, num_beams, caches[0].length.device
        self.B, self.N, self.n_new, self.eos, self.lp = B, N, n_new, eos_id, length_penalty
        self.caches, self.pruner = caches, pruner
        self.K = max(2, 1 + (eos_id is not None)) * N  # candidates per sample each step (transformers' beams_to_keep)
        self.tokens = torch.zeros(B, N, n_new, dtype=torch.long, device=dev)  # each running beam's tokens so far
        self.scores = torch.zeros(B, N, device=dev)  # their summed log-probabilities; at first only beam 0 counts
        self.scores[:, 1:] = -1e9
        self.done_tokens = torch.zeros(B, N, n_new, dtype=torch.long, device=dev)  # finished, best first
        self.done_scores = torch.full((B, N), -1e9, device=dev)  # length-penalised
        self.done_sums = torch.zeros(B, N, device=dev)  # summed log-probabilities
        self.done_len = torch.zeros(B, N, dtype=torch.long, device=dev)
        self.done_finished = torch.zeros(B, N, dtype=torch.bool, device=dev)
        self.done_history = [[None] * N for _ in range(B)]  # each finished hypothesis's pruning history
        self.undecided = torch.ones(B, dtype=torch.bool, device=dev)
        self.over = False  # every sample decided: the caller stops the loop

    def choose(self, t, logits):
        """Step t: logits (B*N, V) of every beam -> the N best continuations of each sample, the finished ones into
        its hypotheses, each beam's rows to its parent's; returns the (B*N,) tokens the beams feed back."""
        B, N, K, dev = self.B, self.N, self.K, logits.device
        V = logits.shape[-1]
        logp = logits.float().log_softmax(-1).view(B, N, V)
        top, idx = (logp + self.scores[..., None]).view(B, N * V).topk(K)  # (B, K): beam-major, as transformers
        parent, token = idx // V, idx % V
        cand = self.tokens.gather(1, parent[..., None].expand(-1, -1, self.n_new)).clone()  # (B, K, n_new)
        cand[:, :, t] = token
        stops = torch.full_like(token, t + 1 >= self.n_new, dtype=torch.bool)
        if self.eos is not None:
            stops |= token == self.eos
        # the running beams: the N best candidates that did not stop
        running = top + stops.float() * -1e9
        keep = running.topk(N).indices  # (B, N)
        # the finished hypotheses: the candidates among the first N that stopped, length-penalised, merged
        length = t + 1  # generated tokens, EOS included
        finished = stops & (torch.arange(K, device=dev) < N)
        score = top / length ** self.lp + (~self.undecided[:, None]).float() * -1e9
        score = score + (~finished).float() * -1e9
        best = torch.cat([self.done_scores, score], 1).topk(N).indices  # (B, N): the old ones first on ties
        self.keep_finished(best, cand, score, top, finished, parent, length)
        self.tokens, self.scores = cand.gather(1, keep[..., None].expand(-1, -1, self.n_new)), running.gather(1, keep)
        # transformers' heuristic: a sample is decided once its N hypotheses are finished and its best running beam,
        # at the current length, cannot beat the worst of them
        worst = torch.where(self.done_finished, self.done_scores.min(1, keepdim=True).values, -1e9)
        self.undecided &= (self.scores[:, :1] / length ** self.lp > worst).any(-1)
        self.over = not bool(self.undecided.any()) or bool(stops.all())
        # each beam's rows (KV caches, pruning state) to its parent's: only the rows whose parent is another row
        rows = (torch.arange(B, device=dev)[:, None] * N + parent.gather(1, keep)).flatten()  # (B*N,)
        moved = (rows != torch.arange(B * N, device=dev)).nonzero()[:, 0]
        if len(moved):
            fast.select_rows(self.caches, rows[moved], moved)
            if self.pruner is not None:
                select_pruner_rows(self.pruner, rows[moved], moved)
        return self.tokens[:, :, t].flatten()

    def keep_finished(self, best, cand, score, top, finished, parent, length):
        """The N best of the old hypotheses and the new candidates (best (B, N): indices into both, old first)."""
        B, N = self.B, self.N
        new = best >= N  # (B, N): a candidate of this step
        c = (best - N).clamp(min=0)
        pick = lambda old, now: torch.where(new.view(B, N, *[1] * (old.dim() - 2)), now, old.gather(  # noqa: E731
            1, best.clamp(max=N - 1).view(B, N, *[1] * (old.dim() - 2)).expand_as(old)))
        self.done_tokens = pick(self.done_tokens, cand.gather(1, c[..., None].expand(-1, -1, self.n_new)))
        self.done_scores = torch.cat([self.done_scores, score], 1).gather(1, best)
        self.done_sums = pick(self.done_sums, top.gather(1, c))
        self.done_len = pick(self.done_len, torch.full_like(self.done_len, length))
        self.done_finished = pick(self.done_finished, finished.gather(1, c))
        histories = []
        for b, row in enumerate(best.tolist()):
            old = self.done_history[b]
            histories.append([old[i] if i < N else self.lineage(b * N + int(parent[b, i - N]), length) for i in row])
        self.done_history = histories

    def lineage(self, row, n_steps):
        return None if self.pruner is None else lineage(self.pruner, row, n_steps)

    def results(self, returns):
        """Sample b's `returns` best hypotheses, best first: (b, tokens, summed log-probability, length-penalised
        score, pruning history)."""
        out = []
        for b in range(self.B):
            for r in range(returns):
                n = int(self.done_len[b, r])
                out.append((b, self.done_tokens[b, r, :n].tolist(), float(self.done_sums[b, r]),
                            float(self.done_scores[b, r]), self.done_history[b][r]))
        return out


def select_pruner_rows(pruner, src, dst):
    """Row dst[i] takes row src[i]'s pruning state (beam search: a beam takes its parent's): the kept image tokens
    and the history of its steps (the caches' rows: fast.select_rows); (D,) long tensors, the rows that change."""
    for t in (pruner.kept_mask, pruner.image_start, pruner.prompt_len, *pruner.deeper_masks):
        if t is not None:
            t[dst] = t[src]
    for h in pruner.history:  # small tensors: each step's (B, ...) record, row by row
        for t in (h.kept_count, h.dropped_mask, h.rate, h.shares, *h.deeper):
            if t is not None:
                t[dst] = t[src]

def lineage(pruner, b, n_steps):
    """Row b's first n_steps step records, as rows of their own (a finished beam's history, kept when it finishes
    while its row goes on to other beams)."""
    return [dyrate.StepRecord(h.kept_count[b:b + 1].clone(), h.dropped_mask[b:b + 1].clone(), h.rate[b:b + 1].clone(),
                       None if h.shares is None else h.shares[b:b + 1].clone(), h.ranked,
                       [m[b:b + 1].clone() for m in h.deeper])
            for h in pruner.history[:n_steps]]


@torch.inference_mode()
def generate(model, tokenizer, images, prompts, max_new_tokens=64, num_beams=2, num_return_sequences=1,
             length_penalty=1.0, rule="none", k=None, conv=None, pad=None, stats=True, allow_protocol_mismatch=False):
    """generate.generate() with beam search: each prompt's rows repeated once per beam (rows b*N .. b*N+N-1), the
    num_return_sequences best hypotheses of each prompt returned best first, each with its scores and its pruning
    history."""
    check_options(num_beams, num_return_sequences, length_penalty)
    core.check_options(max_new_tokens, 0.0, 0, 1.0)
    device = model.language_model.lm_head.weight.device
    batch = core.make_batch(model.config, tokenizer, images, prompts, max_new_tokens, rule, k, conv, pad, stats, device,
                            repeat=num_beams, allow_protocol_mismatch=allow_protocol_mismatch)
    caches = model.new_caches(len(batch.input_ids), max_new_tokens)
    search = BeamSearch(len(prompts), num_beams, max_new_tokens, model.config.eos_token_id, caches, batch.pruner,
                        length_penalty)
    _, out = core.timed_decode(model, batch, caches, max_new_tokens, search.choose, None, lambda token: search.over)
    for b, tokens, logprob, score, history in search.results(num_return_sequences):
        out.rows.append(core.row(tokenizer, batch, b * num_beams, tokens, history, logprob_sum=logprob, score=score))
    return out
