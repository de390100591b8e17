"""Seed statistics for transfer results: mean ± sample std over trials, and Welch's interval for a
difference.

Detection AP varies from trial to trial (MoCo's detection README: std of AP50, AP, AP75 about 0.2,
0.2, 0.4 on VOC, means of 5 trials), so a difference between two pre-trainings is judged against
that noise with an unequal-variance (Welch) t interval, the t quantile taken at the
Welch-Satterthwaite degrees of freedom. With one trial on either side there is no variance
estimate: no std, no interval, no verdict.
"""
import math
from typing import List, Optional

CONFIDENCE = 0.95


def describe(values: List[float]) -> dict:
    """{"mean", "std" (sample, ddof 1; None for n < 2), "n", "values"} of the finite values
    given."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "values": []}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": list(values)}


def welch_interval(a: dict, b: dict, confidence: float = CONFIDENCE) -> Optional[dict]:
    """Difference of means a - b with its Welch t interval; None when either side has n < 2.

    `a` and `b` are `describe` results. Returns {"diff", "low", "high", "df", "significant"}; with
    zero variance on both sides the interval is undefined (df is 0/0) and "significant" is None.
    """
    if a["n"] < 2 or b["n"] < 2:
        return None
    diff = a["mean"] - b["mean"]
    va, vb = a["std"] ** 2 / a["n"], b["std"] ** 2 / b["n"]
    se = math.sqrt(va + vb)
    if se == 0.0:
        return {"diff": diff, "low": None, "high": None, "df": None, "significant": None}
    df = (va + vb) ** 2 / (va ** 2 / (a["n"] - 1) + vb ** 2 / (b["n"] - 1))
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2, df)) * se
    low, high = diff - half, diff + half
    return {"diff": diff, "low": low, "high": high, "df": df,
            "significant": bool(low > 0 or high < 0)}
