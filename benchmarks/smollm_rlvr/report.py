"""Tables and plot of the SmolLM2-135M RLVR benchmark from the json outputs of the other steps.

Reads
    RUN/rewards.jsonl                  training reward per step (train.py)
    SCORES/*.json                      held-out scores with per-problem outcomes (score.py --out)
    WEIGHTS                            weight-space errors against the real final checkpoint (weight_error.py)
    EXTRAP/<name>/relex.json           each extrapolation's provenance and verdict (relex extrapolate)
    ANALYSIS/analysis.json             relex analyze of the whole run (optional)
and writes a markdown report (tables) and a PNG: the training reward curve (moving average) with the
held-out greedy accuracy of real checkpoints and of every predictor of the final step.

Paired differences against the final checkpoint are computed here from the per-problem outcomes (paired
bootstrap over the held-out problems, the same resampling as score.py), so checkpoints scored in separate
score.py runs can be compared. An extrapolation whose weights are byte-identical to one that was scored
(same shard sha256, e.g. `--regressor auto` choosing `anchored`) reuses that score.

    python benchmarks/smollm_rlvr/report.py --run ../smollm_run/run --extrap ../smollm_run/extrap \\
        --scores ../smollm_run/scores/*.json --weights ../smollm_run/weights.json \\
        --analysis ../smollm_run/analysis --final-step 64 \\
        --md ../smollm_run/report.md --png benchmarks/smollm_rlvr/results.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import stats  # noqa: E402  (same bootstrap as score.py)

# (row label, prefix label, kind, folder) — folder relative to RUN ("run:") or EXTRAP ("extrap:")
PREDICTORS = [
    ("last observed", "10%", "last", "run:checkpoint-{p10}"),
    ("RELEX rank-1, linear (default)", "10%", "relex-linear", "extrap:p10-relex-linear"),
    ("RELEX, --regressor auto", "10%", "relex-auto", "extrap:p10-relex-auto"),
    ("RELEX, --regressor anchored", "10%", "relex-anchored", "extrap:p10-relex-anchored"),
    ("element-wise linear", "10%", "elementwise", "extrap:p10-elementwise"),
    ("last observed", "20%", "last", "run:checkpoint-{p20}"),
    ("RELEX rank-1, linear (default)", "20%", "relex-linear", "extrap:p20-relex-linear"),
    ("RELEX, --regressor auto", "20%", "relex-auto", "extrap:p20-relex-auto"),
    ("RELEX, --regressor anchored", "20%", "relex-anchored", "extrap:p20-relex-anchored"),
    ("element-wise linear", "20%", "elementwise", "extrap:p20-elementwise"),
]
COLORS = {"last": "#444444", "relex-linear": "#d62728", "relex-auto": "#9467bd", "relex-anchored": "#2ca02c",
          "elementwise": "#ff7f0e"}


def load_rewards(run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, rewards and seconds/step; a step logged twice (a resumed run) keeps its last record."""
    recs = {}
    for line in (run / "rewards.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            recs[int(r["step"])] = r
    steps = np.array(sorted(recs))
    return (steps, np.array([recs[s]["reward"] for s in steps]),
            np.array([recs[s].get("sec_per_step", np.nan) for s in steps]))


def moving_average(x: np.ndarray, w: int) -> np.ndarray:
    out = np.empty(len(x))
    for i in range(len(x)):
        out[i] = x[max(0, i - w + 1):i + 1].mean()
    return out


def shard_hash(folder: Path) -> str | None:
    meta = folder / "relex.json"
    if meta.exists():
        return json.dumps(json.loads(meta.read_text()).get("shards_sha256"), sort_keys=True)
    return None


def verdict_of(record: dict) -> dict:
    """The verdict of a relex.json or analysis.json, flat: its drift class ("verdict"), drift share, steps and
    statistics beside the random-walk null ("observed", "random_walk_null"). Reads the "verdict" record relex
    writes, and the "diagnostics" record of outputs written by older versions."""
    if "verdict" in record:
        verdict = record["verdict"]
        return {**(verdict.get("diagnostics") or {}), **verdict}
    return record["diagnostics"]


def fmt_ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def fmt_diff(d, ci) -> str:
    return f"{d:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--extrap", type=Path, required=True)
    p.add_argument("--scores", type=Path, nargs="+", required=True)
    p.add_argument("--weights", type=Path)
    p.add_argument("--analysis", type=Path, help="folder written by relex analyze --out")
    p.add_argument("--final-step", type=int, default=64)
    p.add_argument("--p10", type=int, default=6, help="last step of the 10%% prefix")
    p.add_argument("--p20", type=int, default=12, help="last step of the 20%% prefix")
    p.add_argument("--window", type=int, default=8, help="moving-average window of the reward curve (steps)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--md", type=Path)
    p.add_argument("--png", type=Path)
    a = p.parse_args()

    run, extrap = a.run.resolve(), a.extrap.resolve()

    def resolve(spec: str) -> Path:
        root, _, rel = spec.partition(":")
        return (run if root == "run" else extrap) / rel.format(p10=a.p10, p20=a.p20)

    # every scored checkpoint, by resolved folder
    scored: dict[Path, dict] = {}
    for f in a.scores:
        for ck, entry in json.loads(f.read_text())["checkpoints"].items():
            if "per_problem" in entry:
                scored[Path(ck).resolve()] = entry
    by_hash = {h: e for ck, e in scored.items() if (h := shard_hash(ck))}

    final_dir = run / f"checkpoint-{a.final_step}"
    base_dir = run / "checkpoint-0"
    if final_dir not in scored:
        raise SystemExit(f"{final_dir} has not been scored")
    final_pp = np.array(scored[final_dir]["per_problem"]["greedy"])

    weights = {}
    if a.weights and a.weights.exists():
        for label, w in json.loads(a.weights.read_text())["predictors"].items():
            weights[Path(w["path"]).resolve()] = w

    def greedy_of(folder: Path) -> list:
        entry = scored.get(folder)
        if entry is None:
            entry = by_hash[shard_hash(folder)]
        return entry["per_problem"]["greedy"]

    def row_for(folder: Path) -> dict | None:
        entry = scored.get(folder)
        note = ""
        if entry is None:
            h = shard_hash(folder)
            entry = by_hash.get(h) if h else None
            if entry is not None:
                twin = next(ck for ck, e in scored.items() if e is entry)
                note = f"weights identical to {twin.name}"
        if entry is None:
            return None
        pp = np.array(entry["per_problem"]["greedy"])
        s = stats(pp, final_pp, a.n_boot, 0)
        meta = {}
        if (folder / "relex.json").exists():
            rj = json.loads((folder / "relex.json").read_text())
            verdict = verdict_of(rj)
            meta = {"verdict": verdict["verdict"], "drift_share": verdict["drift_share"],
                    "regressor": rj.get("regressor"), "method": rj.get("method")}
            sel = rj.get("selection") or {}
            dec = (sel.get("decisions") or {}).get("run")
            if dec:
                meta["auto_choice"] = dec.get("regressor")
        w = weights.get(folder)
        return {"acc": s["mean"], "ci": s["ci95"], "diff": s["diff_vs_ref"], "diff_ci": s["diff_ci95"],
                "rel_error": w["rel_error"] if w else None, "norm_ratio": w["norm_ratio"] if w else None,
                "cos": w["cos"] if w else None, "note": note, **meta}

    rows = []
    base = row_for(base_dir)
    rows.append(("base (step 0)", "—", "base", base))
    for label, prefix, kind, spec in PREDICTORS:
        folder = resolve(spec)
        r = row_for(folder)
        if r is not None:
            step = a.p10 if prefix == "10%" else a.p20
            last_dir = run / f"checkpoint-{step}"
            if kind != "last" and last_dir in scored:
                # the baseline every extrapolation must beat: stopping at the newest observed checkpoint
                pp = np.array(greedy_of(folder))
                s_last = stats(pp, np.array(scored[last_dir]["per_problem"]["greedy"]), a.n_boot, 0)
                r["diff_last"], r["diff_last_ci"] = s_last["diff_vs_ref"], s_last["diff_ci95"]
            rows.append((f"{label}", f"{prefix} (≤ step {step})", kind, r))
    final = row_for(final_dir)
    rows.append((f"real final checkpoint (step {a.final_step})", "100%", "final", final))

    gain = final["acc"] - base["acc"]
    md = []
    md.append(f"| predictor of step {a.final_step} | observed | held-out greedy acc [95% CI] | "
              f"paired diff vs final [95% CI] | paired diff vs last observed [95% CI] | fraction of the gain | "
              f"‖pred−true‖/‖true−w0‖ | ‖pred−w0‖/‖true−w0‖ | cos(pred−w0, true−w0) |")
    md.append("|---|---|---|---|---|---|---|---|---|")
    for label, prefix, kind, r in rows:
        frac = (r["acc"] - base["acc"]) / gain if abs(gain) > 1e-12 else float("nan")
        note = f" ({r['note']})" if r.get("note") else ""
        we = "—" if r["rel_error"] is None else f"{r['rel_error']:.2f}"
        nr = "—" if r["norm_ratio"] is None else f"{r['norm_ratio']:.2f}"
        cs = "—" if r["cos"] is None or not np.isfinite(r["cos"]) else f"{r['cos']:.3f}"
        diff = "—" if kind == "final" else fmt_diff(r["diff"], r["diff_ci"])
        dlast = fmt_diff(r["diff_last"], r["diff_last_ci"]) if "diff_last" in r else "—"
        md.append(f"| {label}{note} | {prefix} | {r['acc']:.3f} {fmt_ci(r['ci'])} | {diff} | {dlast} | "
                  f"{'—' if kind in ('base', 'final') else f'{frac:+.2f}'} | {we} | {nr} | {cs} |")

    # real checkpoints along the run (held-out accuracy curve)
    curve = []
    for ck, e in scored.items():
        if ck.parent == run and ck.name.startswith("checkpoint-"):
            curve.append((int(ck.name.split("-")[1]), e["greedy"]["mean"], e["greedy"]["ci95"]))
    curve.sort()
    md.append("")
    md.append(f"| real checkpoint | held-out greedy acc [95% CI] | paired diff vs final [95% CI] | "
              f"‖w_t−w_{a.final_step}‖/‖w_{a.final_step}−w0‖ | ‖w_t−w0‖/‖w_{a.final_step}−w0‖ | "
              f"cos(w_t−w0, w_{a.final_step}−w0) |")
    md.append("|---|---|---|---|---|---|")
    for step, m, ci in curve:
        folder = run / f"checkpoint-{step}"
        s_f = stats(np.array(scored[folder]["per_problem"]["greedy"]), final_pp, a.n_boot, 0)
        w = weights.get(folder)
        wcols = (f"{w['rel_error']:.2f} | {w['norm_ratio']:.2f} | "
                 f"{'—' if not np.isfinite(w['cos']) else format(w['cos'], '.3f')}") if w else "— | — | —"
        dcol = "—" if step == a.final_step else fmt_diff(s_f["diff_vs_ref"], s_f["diff_ci95"])
        md.append(f"| step {step} | {m:.3f} {fmt_ci(ci)} | {dcol} | {wcols} |")

    # the verdicts printed by relex extrapolate at each prefix, and relex analyze of the whole run
    md.append("")
    md.append("| window | verdict | drift share | α | drift ratio (max) | cos(first, last) | cos(prefix dir, dir) | "
              "rank-1 expl. var. (null) | R² (null) |")
    md.append("|---|---|---|---|---|---|---|---|---|")
    for prefix, spec in (("10%", "extrap:p10-relex-linear"), ("20%", "extrap:p20-relex-linear")):
        meta = resolve(spec) / "relex.json"
        if meta.exists():
            d = verdict_of(json.loads(meta.read_text()))
            o, n = d["observed"], d["random_walk_null"]
            md.append(f"| {prefix}: steps {int(d['steps'][0])}..{int(d['steps'][-1])} (relex extrapolate) | "
                      f"{d['verdict']} | {d['drift_share']:.2f} | {o['alpha']:.2f} | "
                      f"{o['drift_ratio']:.2f} ({o['drift_ratio_max']:.0f}) | {o['cos_first_last']:.2f} "
                      f"(null {n['cos_first_last']:.2f}) | {o['prefix_cos']:.2f} (null {n['prefix_cos']:.2f}) | "
                      f"{o['explained_rank1']:.3f} ({n['explained_rank1']:.3f}) | {o['r2_rank1']:.3f} "
                      f"({n['r2_rank1']:.3f}) |")
    an = None
    if a.analysis and (a.analysis / "analysis.json").exists():
        an = json.loads((a.analysis / "analysis.json").read_text())
        d = verdict_of(an)
        o, n = d["observed"], d["random_walk_null"]
        md.append(f"| whole run: steps {int(d['steps'][0])}..{int(d['steps'][-1])} (relex analyze) | "
                  f"{d['verdict']} | {d['drift_share']:.2f} | {o['alpha']:.2f} | "
                  f"{o['drift_ratio']:.2f} ({o['drift_ratio_max']:.0f}) | {o['cos_first_last']:.2f} "
                  f"(null {n['cos_first_last']:.2f}) | {o['prefix_cos']:.2f} (null {n['prefix_cos']:.2f}) | "
                  f"{o['explained_rank1']:.3f} ({n['explained_rank1']:.3f}) | {o['r2_rank1']:.3f} "
                  f"({n['r2_rank1']:.3f}) |")
        ranking = an["summary"].get("backtest_ranking") or []
        if ranking:
            md.append("")
            md.append("whole-run backtest (relex analyze), relative weight error at the last held-out checkpoint: "
                      + ", ".join(f"{r['model']} {r['relative_error']:.3f}" for r in ranking))
        lp = an.get("logprob")
        if lp:
            md.append("")
            md.append(f"log-probs of {lp['responses']} held-out answers: per-response R² vs step median "
                      f"{lp['r2_median']:.2f} (random walk {lp['r2_null']['median']:.2f}), mean log-prob "
                      f"{lp['mean_logprob'][0]:.2f} → {lp['mean_logprob'][-1]:.2f}, output-space drift share "
                      f"{lp['drift_share']:.2f} ({lp['drift_verdict']})")

    steps, reward, sec = load_rewards(run)
    md.append("")
    md.append(f"training: {len(steps)} steps logged; seconds/step median {np.nanmedian(sec):.1f}, "
              f"mean {np.nanmean(sec):.1f}, min {np.nanmin(sec):.1f}, max {np.nanmax(sec):.1f}; training reward "
              f"first 8 steps {reward[:8].mean():.3f}, last 8 steps {reward[-8:].mean():.3f}")
    text = "\n".join(md) + "\n"
    print(text)
    if a.md:
        a.md.write_text(text)

    if a.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.35, 1]})
        ax.plot(steps, reward, color="0.8", lw=0.8, marker=".", ms=3, label="training reward (T=0.7, 32 samples)")
        ax.plot(steps, moving_average(reward, a.window), color="#1f77b4", lw=2,
                label=f"training reward, moving average ({a.window} steps)")
        if curve:
            cs = np.array([c[0] for c in curve])
            cm = np.array([c[1] for c in curve])
            lo = cm - np.array([c[2][0] for c in curve])
            hi = np.array([c[2][1] for c in curve]) - cm
            ax.errorbar(cs, cm, yerr=[lo, hi], color="black", marker="s", ms=5, lw=1.2, capsize=3,
                        label="real checkpoints: held-out greedy acc (95% CI)")
        offsets = {"10%": -2.2, "20%": 2.2}
        seen = set()
        for label, prefix, kind, r in rows:
            if kind in ("base", "final", "relex-auto"):
                continue
            pre = prefix.split()[0]
            x = a.final_step + 4.5 + offsets[pre] + {"last": -1.2, "relex-linear": -0.4, "relex-anchored": 0.4,
                                                    "elementwise": 1.2}.get(kind, 0)
            lab = None if kind in seen else {"last": "last observed", "relex-linear": "RELEX linear",
                                             "relex-anchored": "RELEX anchored (= auto)",
                                             "elementwise": "element-wise"}[kind]
            seen.add(kind)
            ax.errorbar([x], [r["acc"]], yerr=[[r["acc"] - r["ci"][0]], [r["ci"][1] - r["acc"]]],
                        color=COLORS[kind], marker="o" if pre == "10%" else "D", ms=5, capsize=2, lw=1,
                        ls="none", label=lab)
        ax.axvline(a.final_step, color="0.6", ls=":", lw=1)
        ax.axhline(base["acc"], color="0.5", ls="--", lw=0.8)
        ax.text(a.final_step * 0.55, base["acc"] + 0.01, "base, held-out greedy", fontsize=7, color="0.4")
        ax.axvspan(0, a.p10, color="#2ca02c", alpha=0.06)
        ax.axvspan(a.p10, a.p20, color="#2ca02c", alpha=0.12)
        ax.text(a.final_step + 4.5, -0.04, "predictors of\nthe final step\n(o 10%, ◆ 20%)", fontsize=7,
                ha="center", va="top")
        ax.set_xlim(-1, a.final_step + 9)
        ax.set_ylim(-0.12, 1.0)
        ax.set_xlabel("GRPO step (shaded: 10% / 20% observed prefixes)")
        ax.set_ylabel("reward / accuracy")
        ax.set_title("SmolLM2-135M-Instruct, GRPO on CPU: reward and held-out accuracy", fontsize=10)
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.52, 0.0), framealpha=0.9)

        # forest plot: paired difference vs the real final
        items = [(f"{prefix.split()[0]} {label}" if kind != "base" else label, kind, r)
                 for label, prefix, kind, r in rows if kind not in ("final", "relex-auto")]
        ys = np.arange(len(items))[::-1]
        for y, (label, kind, r) in zip(ys, items):
            ax2.errorbar([r["diff"]], [y], xerr=[[r["diff"] - r["diff_ci"][0]], [r["diff_ci"][1] - r["diff"]]],
                         color=COLORS.get(kind, "0.3"), marker="o", capsize=3, ls="none")
        ax2.axvline(0, color="black", lw=1)
        ax2.axvline(base["acc"] - final["acc"], color="0.5", ls="--", lw=0.8)
        ax2.set_yticks(ys)
        ax2.set_yticklabels([i[0] for i in items], fontsize=7.5)
        ax2.set_xlabel(f"held-out accuracy − real final (step {a.final_step}), paired 95% CI")
        ax2.set_title(f"predictors of step {a.final_step} vs the real checkpoint (final {final['acc']:.3f})",
                      fontsize=10)
        fig.tight_layout()
        fig.savefig(a.png, dpi=100)
        print(f"wrote {a.png} ({a.png.stat().st_size / 1024:.0f} KB)", file=sys.stderr)


if __name__ == "__main__":
    main()
