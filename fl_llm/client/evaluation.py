"""A platform's evaluation and membership audit, run where its records are: `Evaluation` is
mixed into `Platform`, and reads its model, held-out split and task. Only aggregate figures
leave (metrics, calibration, an interval; the audit's attack statistics)."""

from __future__ import annotations

import time

import numpy as np

from fl_llm.client.parallel import no_grad
from fl_llm.client.rng import platform_rng
from fl_llm.client.train import _answer_loss, _forward
from fl_llm.data.batching import IGNORE, Encoded, collate
from fl_llm.tensors import AdapterState


class Evaluation:
    """Evaluation and audit methods of `Platform` (see there for the attributes they read)."""

    def _example_losses(self, global_state: AdapterState, base: dict | None, train_idx, eval_idx):
        """Per-record answer NLL of `global_state` on the given training and held-out rows. Never
        sent anywhere: `audit` turns them into figures here."""
        self._load_global(global_state, base)
        kw = {"batch_size": self.cfg.client.eval_batch_size, "device": self.device, "pad_id": self.pad_id}
        kw["words"] = self.loss_words
        return example_losses(self.model, self.train_set, train_idx, **kw), example_losses(
            self.model, self.eval_set, eval_idx, **kw
        )

    def audit(
        self,
        start: AdapterState,
        final: AdapterState,
        base: dict | None,
        state_round: int,
        max_examples: int,
        epsilon: float,
        delta: float,
        alpha: float,
    ) -> dict:
        """The membership audit, run where the records are: members are this platform's training
        records, non-members its held-out ones (label-matched); the attacks score both under the
        model before private training (`start`) and the final one (`final`, with the base merges
        `base` and this platform's own state as of round `state_round`). Returns only the
        figures (`fl_llm.privacy.audit.attack_report`); no per-record score leaves."""
        from fl_llm.privacy.audit import attack_report, label_matched_samples

        rng = np.random.default_rng([self.cfg.seed, self.id, 0xA0D])
        members, nonmembers = label_matched_samples(self.train_set.labels, self.eval_set.labels, max_examples, rng)
        base_m, base_n = self._example_losses(start, None, members, nonmembers)
        self.load_state(state_round)
        ft_m, ft_n = self._example_losses(final, base, members, nonmembers)
        split_rng = np.random.default_rng([self.cfg.seed, self.id, 0xA0E])
        return {
            "members": len(members),
            "nonmembers": len(nonmembers),
            "mean_loss": {"members": float(ft_m.mean()), "nonmembers": float(ft_n.mean())},
            "attacks": {
                "loss": attack_report(-ft_m, -ft_n, epsilon, delta, alpha, split_rng),
                "reference": attack_report(base_m - ft_m, base_n - ft_n, epsilon, delta, alpha, split_rng),
            },
        }

    def evaluate(
        self, global_state: AdapterState, base: dict | None = None, detail: bool = False, generate: bool = False
    ) -> dict:
        """Loss and task metrics of `global_state` on this platform's held-out split (after the
        base merges in `base`; FedSA: with this platform's own B). For a yes/no task also its
        calibration (ECE) and the decision threshold chosen on one half of the held-out records
        (best F1) with the precision and recall it gets on the other half. `detail` (for `fl-llm
        compare`) adds the reliability bins and a bootstrap interval of the headline metric. The
        instruction task: `generate` (or `detail`) answers the held-out prompts by generation."""
        t0 = time.perf_counter()
        self._load_global(global_state, base)
        if self.task.generative:
            result = self._evaluate_answers(generate or detail)
            result["eval_seconds"] = time.perf_counter() - t0
            return result
        out = evaluate_model(
            self.model,
            self.eval_set,
            answer_ids=self.answer_ids,
            batch_size=self.cfg.client.eval_batch_size,
            device=self.device,
            pad_id=self.pad_id,
            words=self.loss_words,
        )
        probs = out["probs"]
        scores = probs[:, 1] if probs.shape[1] == 2 else probs
        metrics = self.task.metrics(self.eval_set.labels, scores, self.eval_set.groups)
        result = {k: float(v) for k, v in metrics.items()}
        result["eval_loss"] = out["loss_sum"] / max(out["tokens"], 1)
        result["num_eval"] = len(self.eval_set)
        labels = np.asarray(self.eval_set.labels)
        if probs.shape[1] == 2 and len(labels) >= 4:
            result.update(self._calibration(labels, scores, detail))
        if detail:
            from fl_llm.metrics import bootstrap_interval

            primary = self.task.primary
            rng = platform_rng(self.cfg.seed, 0, self.id, 0xB007)
            groups = self.eval_set.groups

            def headline(y, s):
                return self.task.metrics(y, s, None if primary.startswith(("hr@", "ndcg@")) else groups)[primary]

            result["interval"] = list(bootstrap_interval(labels, scores, headline, rng))
        result["eval_seconds"] = time.perf_counter() - t0
        return result

    def _evaluate_answers(self, generate: bool) -> dict:
        """A conversation task: loss and perplexity of the reference answers; with `eval.choices`
        the answer's probability (choice accuracy, AUC); with `generate` the generated answers'
        exact match, token F1, ROUGE-L and chrF, overall and per skill, and sample generations
        where allowed (not under record-level DP unless `eval.samples_under_dp`)."""
        from fl_llm.generation import generate_answers
        from fl_llm.metrics import roc_auc
        from fl_llm.text_metrics import by_tag

        enc, ev = self.eval_set, self.cfg.eval
        out = evaluate_model(
            self.model,
            enc,
            answer_ids=self.answer_ids,
            batch_size=self.cfg.client.eval_batch_size,
            device=self.device,
            pad_id=self.pad_id,
        )
        loss = out["loss_sum"] / max(out["tokens"], 1)
        result = {"eval_loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "num_eval": len(enc)}
        if self.answer_ids:
            labels, probs = enc.labels, out["probs"]
            scored = labels >= 0  # references that are one of the choices
            if scored.any():
                result["choice_accuracy"] = float((probs[scored].argmax(1) == labels[scored]).mean())
                if probs.shape[1] == 2 and len(set(labels[scored].tolist())) == 2:
                    result["auc"] = roc_auc(labels[scored], probs[scored, 1])
        if not generate:
            return result
        n = ev.generate_examples or len(enc)
        seed = int(platform_rng(self.cfg.seed, 0, self.id, 0x6E).integers(2**31))
        answers = generate_answers(
            self.model,
            self.tokenizer,
            enc.prompts[:n],
            settings=ev,
            batch_size=self.cfg.client.eval_batch_size,
            device=self.device,
            seed=seed,
            synced=self.group is not None and self.group.sharded,
        )
        result.update(by_tag(answers, enc.references[:n], enc.tags[:n]))
        result["num_generated"] = len(answers)
        private = self.cfg.privacy.dp.level == "record" and not ev.samples_under_dp
        if ev.samples and not private:
            result["samples"] = [
                {"prompt": self.tokenizer.decode(p, skip_special_tokens=False), "reference": r, "answer": a}
                for p, r, a in zip(enc.prompts[: ev.samples], enc.references, answers)
            ]
        return result

    def _calibration(self, labels: np.ndarray, scores: np.ndarray, detail: bool) -> dict:
        from fl_llm.metrics import at_threshold, best_f1_threshold, calibration

        ece, bins = calibration(labels, scores)
        order = platform_rng(self.cfg.seed, 0, self.id, 0x7E5).permutation(len(labels))
        val, test = order[: len(order) // 2], order[len(order) // 2 :]
        threshold = best_f1_threshold(labels[val], scores[val])
        at = at_threshold(labels[test], scores[test], threshold)
        out = {"ece": ece, "threshold": threshold, **{f"{k}@threshold": v for k, v in at.items()}}
        if detail:
            out["reliability"] = bins
        return out


def evaluate_model(
    model, enc: Encoded, *, answer_ids: list[int], batch_size: int, device, pad_id, words: list[int] | None = None
) -> dict:
    """Answer-token loss (over `words` alone when given, as in training) and the probability of
    each answer at the end of the prompt.

    Returns `loss_sum`, `tokens` and `probs` (examples x answers, normalised over the answers).
    """
    import torch

    model.eval()
    loss_sum, tokens, probs = 0.0, 0, []
    with no_grad(model):
        for start in range(0, len(enc), batch_size):
            idx = np.arange(start, min(start + batch_size, len(enc)))
            batch = collate(enc, idx, pad_id)
            logits, targets = _forward(model, batch, device)
            loss_sum += float(_answer_loss(logits, targets, "sum", words))
            tokens += int((targets != IGNORE).sum())
            if not answer_ids and "keep" in batch:  # a conversation without choices: the loss only
                continue
            if "keep" in batch:
                rows = torch.arange(len(idx), device=logits.device)
                pos = torch.from_numpy(batch["score_idx"]).to(logits.device)
                answer_logits = logits[rows, pos][:, answer_ids]
            else:
                answer_logits = logits
            probs.append(torch.softmax(answer_logits, dim=-1).cpu().numpy())
    return {"loss_sum": loss_sum, "tokens": tokens, "probs": np.concatenate(probs) if probs else None}


def example_losses(
    model, enc: Encoded, idx: np.ndarray, *, batch_size: int, device, pad_id, words: list[int] | None = None
) -> np.ndarray:
    """Mean answer-token NLL of each example in `idx` (the membership audit's raw material), with
    the loss the run trained on (`words`: the verbalizer loss)."""

    model.eval()
    out = []
    with no_grad(model):
        for start in range(0, len(idx), batch_size):
            rows = idx[start : start + batch_size]
            logits, targets = _forward(model, collate(enc, rows, pad_id), device)
            nll = _answer_loss(logits, targets, "none", words)
            counts = (targets != IGNORE).sum(-1).clamp(min=1) if targets.dim() > 1 else 1
            out.append((nll.sum(-1) / counts if targets.dim() > 1 else nll).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)
