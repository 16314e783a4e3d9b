"""The report's words, figure by figure: what the student report observed (quoted from the
project's issue) and what this implementation shows, with the numbers of the same run; and
the one-line headline of each figure for the summary table at the top of report.md."""

from __future__ import annotations

import itertools
import math
from typing import Any

from microadam.bench.classic import BC, Variant
from microadam.bench.report import fmt
from microadam.bench.reproduce.experiments import (
    ADAM,
    ADAM_99,
    ADAM_FAST,
    D1,
    D1_EF,
    D1_EF8,
    D1_EF_99,
    D10,
    D100,
    D100_99,
    D100_SLOW,
    PANELS,
    WINDOW,
    step_ratio,
    steps_per_epoch,
)
from microadam.bench.reproduce.runs import Runs
from microadam.bench.reproduce.stats import TARGET, num

__all__ = [
    "LOSS_FLOOR",
    "OBSERVED",
    "memory_headline",
    "memory_text",
    "panel_headline",
    "panel_text",
    "rosenbrock_headline",
    "rosenbrock_text",
]

_GENERAL = (
    "The issue names this experiment without a specific observation; of the report as a "
    'whole it says that its training curves on iris and breast cancer "found instability '
    'and divergence".'
)
OBSERVED = {
    1: _GENERAL,
    2: _GENERAL,
    3: '"sparser densities, where the report saw the error feedback turn unstable".',
    4: '"Adam against MicroAdam with the same betas, over a long horizon where the report '
    'saw MicroAdam diverge".',
    5: _GENERAL,
    6: "Not from the report: the MicroAdam paper uses this toy to motivate error feedback "
    "(Adam, Top-K Adam, and Top-K Adam with error feedback on Rosenbrock's function).",
    7: '"the evaluation the report could not do: optimizer-state bytes per parameter for '
    'every registry optimizer on the lm model at three sizes".',
}


# Training losses below this are float32 rounding of a perfect fit (the cross-entropy of
# a confident correct prediction is 0 or a few ulps of 1); their order means nothing.
LOSS_FLOOR = 1e-6


def _cmp(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "not comparable with"
    if a == b:
        return "equal to"
    if max(a, b) < LOSS_FLOOR:
        return "level with"
    return "below" if a < b else "above"


def _spike_text(s: dict[str, Any]) -> str:
    if s["diverged"]:
        return f"{s['diverged']} of {s['seeds']} seeds diverged ({s['messages'][0]})"
    if sum(s["spikes"]) == 0:
        return "no spike"
    return (
        f"spikes in {', '.join(map(str, s['spikes']))} epochs of its {s['seeds']} seed(s), "
        f"the last at epoch {s['last_spike']}, largest rise +{fmt(s['rise'])} from "
        f"{fmt(s['rise_from'])}"
    )


def _reach_text(s: dict[str, Any]) -> str:
    if s["reach"] is not None:
        return f"reaches {TARGET:g} at epoch {s['reach']:g}"
    if s["reached"]:
        return f"reaches {TARGET:g} in {s['reached']} of {s['seeds']} seeds"
    return f"never reaches {TARGET:g}"


def _diverged_text(stats_by_panel: list[dict[str, dict]], where: str = "") -> str:
    runs = sum(s["seeds"] for st in stats_by_panel for s in st.values())
    bad = sum(s["diverged"] for st in stats_by_panel for s in st.values())
    where = f" {where}" if where else ""
    return f"{bad or 'None'} of the {runs} runs diverged{where}."


def _text_fig1(stats_by_panel: list[dict[str, dict]], runs: Runs) -> list[str]:
    st = stats_by_panel[0]
    a, d100, d10, d1 = (st[v.label] for v in (ADAM, D100, D10, D1))
    horizon = runs.epochs * steps_per_epoch(BC)
    return [
        _diverged_text(stats_by_panel),
        f"Final training loss, median over seeds: density 100% {fmt(d100['final'])}, 10% "
        f"{fmt(d10['final'])}, 1% {fmt(d1['final'])}; Adam {fmt(a['final'])}.",
        f"At 1% without error feedback the loss {_reach_text(d1)}: its best is "
        f"{fmt(d1['best'])} and over the last 10% of the epochs it moves between "
        f"{fmt(d1['late'][0])} and {fmt(d1['late'][1])} ({_spike_text(d1)}). What Top-K drops "
        f"({100 * (1 - d1['eff']):.1f}% of each gradient) is lost for good, and which few "
        f"entries are kept changes from batch to batch. At 10% the loss {_reach_text(d10)} "
        f"({_spike_text(d10)}).",
        f"Density 100% (whose window holds {WINDOW} dense gradients: {d100['state']:.0f} "
        f"state bytes per parameter) {_reach_text(d100)}, Adam with the same lr at epoch "
        f"{a['reach'] if a['reach'] is not None else 'never'}: past the window of {WINDOW} "
        f"steps MicroAdam's step grows to {step_ratio(horizon):.2f}x Adam's (Figure 4); "
        f"density 100% shows {_spike_text(d100)}, Adam {_spike_text(a)}.",
    ]


def _text_fig2(stats_by_panel: list[dict[str, dict]], runs: Runs) -> list[str]:
    lines = [_diverged_text(stats_by_panel)]
    for panel, st in zip(PANELS[2], stats_by_panel, strict=True):
        a, d100, ef, no = (st[v.label] for v in (ADAM, D100, D1_EF, D1))
        lines.append(
            f"{panel.title[0].upper()}{panel.title[1:]}: at 1% ({100 * ef['eff']:.2f}% "
            f"effective) the final loss is {fmt(ef['final'])} with error feedback, "
            f"{fmt(no['final'])} without, {fmt(d100['final'])} dense (MicroAdam 100%) and "
            f"{fmt(a['final'])} with Adam: error feedback ends "
            f"{_cmp(ef['final'], no['final'])} no error feedback and "
            f"{_cmp(ef['final'], a['final'])} Adam. With error feedback: {_spike_text(ef)}; "
            f"without: {_spike_text(no)}. Held-out accuracy (EF / no EF / dense / Adam): "
            f"{fmt(100 * ef['acc'], 4)} / {fmt(100 * no['acc'], 4)} / "
            f"{fmt(100 * d100['acc'], 4)} / {fmt(100 * a['acc'], 4)}%."
        )
    iris = stats_by_panel[0][D1_EF.label]
    lines.append(
        f"Iris' linear layer has {iris['num_params']} parameters in two tensors (12 weights, "
        f"3 biases), so every density up to 1/12 keeps one weight and one bias per step "
        f"({100 * iris['eff']:.1f}%)."
    )
    return lines


def _text_fig3(stats_by_panel: list[dict[str, dict]], runs: Runs) -> list[str]:
    st = stats_by_panel[0]
    variants = PANELS[3][0].variants
    parts = []
    for v in variants:
        s = st[v.label]
        parts.append(
            f"{v.label.split(',')[0].replace('MicroAdam ', '')} keeps {sum(s['kept'])} "
            f"({100 * s['eff']:.2f}%), ends at {fmt(s['final'])} and {_reach_text(s)}, with "
            f"{_spike_text(s)}"
        )
    sparse = st[variants[-1].label]
    worst_final = max(variants, key=lambda v: num(st[v.label]["final"]))
    return [
        _diverged_text(stats_by_panel),
        "With error feedback: " + "; ".join(parts) + ".",
        f"The highest final loss is {worst_final.label}'s. Below 1% the nominal density "
        "barely changes what is kept on this net: MicroAdam keeps at least one entry per "
        "Top-K block, "
        "and the 30-8-2 MLP's four tensors have 240, 8, 16 and 2 entries, so "
        + ", ".join(
            f"{v.label.split(',')[0].replace('MicroAdam ', '')} keeps "
            f"{'+'.join(map(str, st[v.label]['kept']))}"
            for v in variants
        )
        + f". At {variants[-1].label.split(',')[0].replace('MicroAdam ', '')} the 4-bit error "
        f"buffer carries {100 * (1 - sparse['eff']):.1f}% of every gradient to later steps.",
    ]


def _text_fig4(stats_by_panel: list[dict[str, dict]], runs: Runs) -> list[str]:
    s999, s99 = stats_by_panel
    a, d100, ef, slow, fast = (s999[v.label] for v in (ADAM, D100, D1_EF, D100_SLOW, ADAM_FAST))
    a2, d2, ef2 = (s99[v.label] for v in (ADAM_99, D100_99, D1_EF_99))
    horizon = runs.epochs * steps_per_epoch(BC)
    r999, r99 = step_ratio(horizon), step_ratio(horizon, (0.9, 0.99))
    return [
        _diverged_text(stats_by_panel, f"in {runs.epochs} epochs ({horizon:,} steps)"),
        f"Betas (0.9, 0.999): Adam ends at {fmt(a['final'])} and {_reach_text(a)} "
        f"({_spike_text(a)}); MicroAdam 100% ends at {fmt(d100['final'])} and "
        f"{_reach_text(d100)} ({_spike_text(d100)}); MicroAdam 1% with error feedback ends "
        f"at {fmt(ef['final'])} and {_reach_text(ef)} ({_spike_text(ef)}).",
        f"Betas (0.9, 0.99): Adam {fmt(a2['final'])} ({_spike_text(a2)}), MicroAdam 100% "
        f"{fmt(d2['final'])} ({_spike_text(d2)}), 1% with error feedback {fmt(ef2['final'])} "
        f"({_spike_text(ef2)}).",
        f"Why MicroAdam is not Adam with the same betas and lr: both bias-correct with the "
        f"full step count t, but MicroAdam's moments sum only the last {WINDOW} gradients, so "
        f"for a coordinate kept at every step its step is Adam's times (1 - b1^{WINDOW}) / "
        f"(1 - b1^t) / sqrt((1 - b2^{WINDOW}) / (1 - b2^t)): {step_ratio(100):.2f} at "
        f"t = 100, {step_ratio(1000):.2f} at 1,000 and {r999:.2f} at {horizon:,} with betas "
        f"(0.9, 0.999), but {r99:.2f} at most with (0.9, 0.99) (third panel). MicroAdam at lr "
        f"1e-3 thus takes, late in training, the steps of Adam at lr {1e-3 * r999:.1e}. At "
        f"lr 1e-3 / 6.5, where its late steps match Adam's, MicroAdam 100% ends at "
        f"{fmt(slow['final'])} and {_reach_text(slow)} ({_spike_text(slow)}); Adam at lr "
        f"6.5e-3, the step MicroAdam takes at lr 1e-3, ends at {fmt(fast['final'])} and "
        f"{_reach_text(fast)} ({_spike_text(fast)}).",
    ]


def _raw_feature_max() -> float:
    from microadam.bench.tabular import load_tabular

    return float(load_tabular("breast-cancer", 0.2, standardize=False).x_train.max())


def _text_fig5(stats_by_panel: list[dict[str, dict]], runs: Runs) -> list[str]:
    raw, std = stats_by_panel
    a, e4, e8 = (raw[v.label] for v in (ADAM, D1_EF, D1_EF8))
    sa, s4, s8 = (std[v.label] for v in (ADAM, D1_EF, D1_EF8))
    every = all(sum(s["spikes"]) or s["diverged"] for s in (a, e4, e8))
    return [
        _diverged_text(stats_by_panel),
        f"Raw features (values up to {_raw_feature_max():,.0f}) at lr 1e-3: "
        f"Adam {_spike_text(a)}, final loss {fmt(a['final'])}, held-out accuracy "
        f"{fmt(100 * a['acc'], 4)}%; MicroAdam 1% with 4-bit error feedback {_spike_text(e4)}, "
        f"final {fmt(e4['final'])}, {fmt(100 * e4['acc'], 4)}%; with 8-bit error feedback "
        f"{_spike_text(e8)}, final {fmt(e8['final'])}, {fmt(100 * e8['acc'], 4)}%."
        + (" Every optimizer is unstable on raw features, Adam included." if every else ""),
        f"8-bit error feedback ends {_cmp(e8['final'], e4['final'])} 4-bit on raw features "
        f"and {_cmp(s8['final'], s4['final'])} it on standardized ones (Adam "
        f"{fmt(sa['final'])}, 4-bit {fmt(s4['final'])}, 8-bit {fmt(s8['final'])}), for "
        f"{s8['state'] - s4['state']:.2f} more state bytes per parameter ({s4['state']:.2f} "
        f"against {s8['state']:.2f}).",
    ]


def _path_length(path: list[list[float]]) -> float:
    return sum(math.dist(p, q) for p, q in itertools.pairwise(path))


def rosenbrock_text(res: dict[str, dict[str, Any]]) -> list[str]:
    parts = [
        f"{name}: f = {r['final']:.3g}, {r['distance']:.3g} from the minimum (1, 1), path "
        f"length {_path_length(r['path']):.3g}"
        for name, r in res.items()
    ]
    lengths = {name: _path_length(r["path"]) for name, r in res.items()}
    adam, last = next(iter(lengths)), list(lengths)[-1]
    return [
        "; ".join(parts) + f". {last.split(' (')[0]}'s path is "
        f"{lengths[last] / lengths[adam]:.1f}x as long as Adam's.",
        "Our reconstruction: the start, lr and number of steps are ours (Rosenbrock's classic "
        "start). Top-K Adam is MicroAdam keeping 1 of the 2 coordinates per step with a "
        "window as long as the run, so that its moments are Adam's dense moments of the "
        f"sparse gradients; the last line is MicroAdam itself, window {WINDOW}, whose late "
        f"steps are up to {step_ratio(10**6):.1f}x larger (Figure 4).",
    ]


def memory_text(table: Any) -> list[str]:
    sizes = list(table.sizes)
    mid = sizes[len(sizes) // 2]
    vals = {n: row[mid] for n, row in table.values.items() if row.get(mid) is not None}
    ranked = sorted(vals, key=vals.get)
    micro, adamw = vals.get("microadam"), vals.get("adamw")
    lines = [
        f"At the {mid} size ({table.sizes[mid] / 1e6:.2f}M parameters), from least to most "
        "state: " + ", ".join(f"{n} {vals[n]:.3g}" for n in ranked) + " bytes per parameter."
    ]
    if micro and adamw:
        spread = [v for v in table.values["microadam"].values() if v]
        lo, hi = min(spread), max(spread)
        lines.append(
            f"MicroAdam keeps {lo:.3f} to {hi:.3f} bytes per parameter over the three sizes "
            f"against AdamW's {adamw:.3f}, {adamw / micro:.1f}x less."
        )
        below = [n for n in ranked if vals[n] < micro]
        if below:
            lines.append(
                f"Less than MicroAdam keep only {', '.join(below)} (SGD without momentum keeps "
                "nothing; Adafactor factors the second moment and keeps no first moment)."
                if set(below) <= {"sgd", "adafactor"}
                else f"Less than MicroAdam keep only {', '.join(below)}."
            )
    return lines


_PANEL_TEXTS = {1: _text_fig1, 2: _text_fig2, 3: _text_fig3, 4: _text_fig4, 5: _text_fig5}


def panel_text(f: int, stats_by_panel: list[dict[str, dict]], runs: Runs) -> list[str]:
    """What this implementation shows in figure ``f`` (1 to 5), sentence by sentence."""
    return _PANEL_TEXTS[f](stats_by_panel, runs)


# -- one line per figure for the summary table at the top of the report ----------------------


def rosenbrock_headline(res: dict[str, dict[str, Any]]) -> str:
    return "; ".join(f"{n.split(' (')[0]} f = {r['final']:.2g}" for n, r in res.items())


def memory_headline(table: Any) -> str:
    vals = {n: row.get("medium") for n, row in table.values.items()}
    if vals.get("microadam") and vals.get("adamw"):
        return (
            f"MicroAdam {vals['microadam']:.3f} bytes per parameter, AdamW "
            f"{vals['adamw']:.3f} ({vals['adamw'] / vals['microadam']:.1f}x less)"
        )
    return "see the table"


def _spikes(st: dict[str, dict], v: Variant) -> str:
    return str(sum(st[v.label]["spikes"]))


def panel_headline(f: int, data: list[dict[str, dict]], runs: Runs) -> str:
    bad = sum(s["diverged"] for st in data for s in st.values())
    total = sum(s["seeds"] for st in data for s in st.values())
    head = f"{bad} of {total} runs diverged"
    if f == 1:
        st = data[0]
        return (
            f"{head}; final loss 100% {fmt(st[D100.label]['final'])}, 10% "
            f"{fmt(st[D10.label]['final'])}, 1% {fmt(st[D1.label]['final'])} (Adam "
            f"{fmt(st[ADAM.label]['final'])}); spike epochs at 1%: {_spikes(st, D1)}"
        )
    if f == 2:
        return (
            f"{head}; final loss at 1% with / without error feedback: iris "
            f"{fmt(data[0][D1_EF.label]['final'])} / {fmt(data[0][D1.label]['final'])}, "
            f"breast cancer {fmt(data[1][D1_EF.label]['final'])} / "
            f"{fmt(data[1][D1.label]['final'])}"
        )
    if f == 3:
        st = data[0]
        return f"{head}; spike epochs " + ", ".join(
            f"{v.label.split(',')[0].replace('MicroAdam ', '')} {_spikes(st, v)}"
            for v in PANELS[3][0].variants
        )
    if f == 4:
        st = data[0]
        horizon = runs.epochs * steps_per_epoch(BC)
        return (
            f"{head} over {horizon:,} steps; epochs to {TARGET:g}: Adam "
            f"{st[ADAM.label]['reach']}, MicroAdam 100% {st[D100.label]['reach']}; late step "
            f"{step_ratio(horizon):.2f}x Adam's"
        )
    raw = data[0]
    return (
        f"{head}; spike epochs on raw features: Adam {_spikes(raw, ADAM)}, 4-bit EF "
        f"{_spikes(raw, D1_EF)}, 8-bit EF {_spikes(raw, D1_EF8)}"
    )
