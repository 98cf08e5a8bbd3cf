"""Elementary functions with the same bits on every machine: exp, expm1, log2, sin/cos, sigmoid, silu, dot.

A library's `exp` or `sin` is free to differ in its last bit between CPUs, instruction sets, libm builds and
devices (glibc picks an FMA variant at run time, numpy has AVX-512 loops, CUDA its own), so nothing that
decides a coding distribution may call one. These are built from IEEE-754 float64 operations that are
correctly rounded by the standard — +, −, ×, ÷, √, rounding to an integer, scaling by a power of two — each
applied as its own numpy ufunc (so no compiler can fuse two into one FMA), in a fixed order. Any conforming
implementation that performs the same operations in the same order gets the same bits; `docs/format.md`
lists the constants. Accuracy is a few units in the last place, which is all the codec needs: what matters is
that encoder and decoder agree, not that they agree with the true function.
"""

from __future__ import annotations

import math

import numpy as np

# Cody–Waite splits of ln 2 and π/2 (fdlibm's): the high parts have trailing zero bits, so k·HI is exact for
# the |k| that occur here (< 2^11 for exp, < 2^20 for sin/cos).
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
INV_LN2 = 1.44269504088896338700e+00
PIO2_1 = 1.57079632673412561417e+00
PIO2_2 = 6.07710050630396597660e-11
PIO2_3 = 2.02226624879595063154e-21
TWO_OVER_PI = 6.36619772367581382433e-01
SQRT_HALF = 0.70710678118654752440
LOG_TERMS = 15  # odd terms of 2·atanh(s) on |s| ≤ 0.172: the last is below 2^−70
EXP_TERMS = 15  # Taylor terms of e^r on |r| ≤ ln2/2: the 15th is below 2^−60
SIN_TERMS = 10  # Taylor terms of sin and cos on |r| ≤ π/4


def _f(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _taylor_exp(r: np.ndarray, first: int) -> np.ndarray:
    """Σ_{n ≥ first} rⁿ/n! up to n = EXP_TERMS, by Horner's rule from the highest term."""
    acc = np.full_like(r, 1.0 / math.factorial(EXP_TERMS))
    for n in range(EXP_TERMS - 1, first - 1, -1):
        acc = np.add(np.multiply(acc, r), 1.0 / math.factorial(n))
    for _ in range(first):
        acc = np.multiply(acc, r)
    return acc


def exp(x) -> np.ndarray:
    """e^x, float64 elementwise (x clamped to [−745, 709]; below that the result underflows to 0)."""
    x = np.clip(_f(x), -745.0, 709.0)
    k = np.rint(np.multiply(x, INV_LN2))
    r = np.subtract(np.subtract(x, np.multiply(k, LN2_HI)), np.multiply(k, LN2_LO))
    return np.ldexp(_taylor_exp(r, 0), k.astype(np.int64))


def expm1(x) -> np.ndarray:
    """e^x − 1, accurate for small |x| (Taylor series below ½ in magnitude, exp(x) − 1 above)."""
    x = _f(x)
    small = np.abs(x) < 0.5
    out = np.subtract(exp(x), 1.0)
    if small.any():
        out = np.where(small, _taylor_exp(np.where(small, x, 0.0), 1), out)
    return out


def sin_cos(x) -> tuple[np.ndarray, np.ndarray]:
    """(sin x, cos x), float64 elementwise, for |x| < 2^20 (larger arguments are refused)."""
    x = _f(x)
    if not np.all(np.abs(x) < 2.0 ** 20):
        raise ValueError("sin_cos: argument out of range (|x| must be below 2^20)")
    k = np.rint(np.multiply(x, TWO_OVER_PI))
    r = np.subtract(np.subtract(np.subtract(x, np.multiply(k, PIO2_1)), np.multiply(k, PIO2_2)),
                    np.multiply(k, PIO2_3))
    r2 = np.multiply(r, r)
    s = np.full_like(r, (-1.0) ** SIN_TERMS / math.factorial(2 * SIN_TERMS + 1))
    c = np.full_like(r, (-1.0) ** SIN_TERMS / math.factorial(2 * SIN_TERMS))
    for n in range(SIN_TERMS - 1, -1, -1):
        s = np.add(np.multiply(s, r2), (-1.0) ** n / math.factorial(2 * n + 1))
        c = np.add(np.multiply(c, r2), (-1.0) ** n / math.factorial(2 * n))
    s = np.multiply(s, r)
    q = np.mod(k.astype(np.int64), 4)
    sin = np.choose(q, [s, c, np.negative(s), np.negative(c)])
    cos = np.choose(q, [c, np.negative(s), np.negative(c), s])
    return sin, cos


def log2(x) -> np.ndarray:
    """log₂ x for x > 0: x = m·2^e with m in [√½, √2) (exact), log m = 2·atanh(s), s = (m − 1)/(m + 1), by
    its odd series to s^(2·LOG_TERMS − 1)."""
    x = _f(x)
    if not np.all(x > 0):
        raise ValueError("log2: arguments must be positive")
    m, e = np.frexp(x)  # x = m·2^e, m in [½, 1)
    low = m < SQRT_HALF
    m = np.where(low, np.multiply(m, 2.0), m)
    e = np.where(low, e - 1, e).astype(np.float64)
    s = np.divide(np.subtract(m, 1.0), np.add(m, 1.0))
    s2 = np.multiply(s, s)
    acc = np.full_like(s, 1.0 / (2 * LOG_TERMS - 1))
    for n in range(LOG_TERMS - 2, -1, -1):
        acc = np.add(np.multiply(acc, s2), 1.0 / (2 * n + 1))
    ln_m = np.multiply(np.multiply(acc, s), 2.0)
    return np.add(np.multiply(ln_m, INV_LN2), e)


def sigmoid(x) -> np.ndarray:
    """1/(1 + e^−x)."""
    return np.divide(1.0, np.add(1.0, exp(np.negative(_f(x)))))


def silu(x) -> np.ndarray:
    """x·sigmoid(x) (swish)."""
    x = _f(x)
    return np.multiply(x, sigmoid(x))


def dot(matrix, vector) -> np.ndarray:
    """matrix (m, n) @ vector (n,) with each row's sum correctly rounded (`math.fsum` of the rounded
    products), so the result does not depend on a summation order."""
    prods = np.multiply(_f(matrix), _f(vector)[None, :])
    return np.array([math.fsum(row) for row in prods], dtype=np.float64)


def l1_norms(matrix) -> np.ndarray:
    """Σ|row| of each row of a 2-d array, each correctly rounded."""
    return np.array([math.fsum(row) for row in np.abs(_f(matrix))], dtype=np.float64)
