"""The loss terms of docs/method.md written out in plain Python float64 (lists and math, no torch ops): the check
of the reference that does not share its code, and of any backend on float64 inputs."""
import math


def softmax(v, T=1.0):
    m = max(x / T for x in v)
    e = [math.exp(x / T - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def ce(v, y, eps):
    """CE_eps of one row; y a label, or a soft target row (a list): -sum_c ((1-eps) t_c + eps/C) log p_c."""
    logp = [math.log(p) for p in softmax(v)]
    if isinstance(y, list):
        C = len(v)
        return -sum(((1 - eps) * t + eps / C) * lp for t, lp in zip(y, logp))
    return (1 - eps) * -logp[y] + eps * -sum(logp) / len(v)


def label(y):
    """The class the orthogonality mask zeroes: y, or a soft row's first maximal index."""
    return y.index(max(y)) if isinstance(y, list) else y


def kl(target, learner, T):
    p, q = softmax(target, T), softmax(learner, T)
    return T * T * sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def ol(groups, y, theta):
    us = []
    for g in groups:
        g = [0.0 if c == y else x for c, x in enumerate(g)]
        norm = max(math.sqrt(sum(x * x for x in g)), 1e-12)
        us.append([x / norm for x in g])
    n = len(us)
    if n == 1:
        return 0.0
    pen = [max(sum(a * b for a, b in zip(us[p], us[q])) - theta, 0.0) ** 2
           for p in range(n) for q in range(n) if p != q]
    return sum(pen) / len(pen)


def head_terms(xs, xt, W, b, zt, zs, y, cfg):
    """(L_sce, L_skl, L_ol) of one stage from Python lists (y: labels or soft target rows)."""
    B, C, n = len(xs), len(zt[0]), cfg.n_sublogits
    sce = skl = orth = 0.0
    for i in range(B):
        x = xs[i] + xt[i]  # the concatenation [x_s, x_t]
        z = [sum(W[r][k] * x[k] for k in range(len(x))) + (b[r] if b is not None else 0.0) for r in range(n * C)]
        groups = [[cfg.student_scale * z[j * C + c] + cfg.teacher_scale * zt[i][c] for c in range(C)]
                  for j in range(n)]
        sce += sum(ce(g, y[i], cfg.label_smoothing) for g in groups) / n
        skl += sum(kl(g, zs[i], cfg.temperature) for g in groups) / n
        orth += ol(groups, label(y[i]), cfg.ol_threshold)
    return sce / B, skl / B, orth / B


def head_terms_of(inputs: dict, cfg):
    """head_terms of hcd_head_loss's input tensors (a dict keyed by argument name)."""
    lists = {k: (v.tolist() if v is not None else None) for k, v in inputs.items()}
    return head_terms(lists["x_student"], lists["x_teacher"], lists["weight"], lists["bias"],
                      lists["teacher_logits"], lists["student_logits"], lists["target"], cfg)


def student_terms_of(student_logits, teacher_logits, target, cfg):
    """(L_ce, L_kd) of student_loss's input tensors."""
    zs, zt, y = student_logits.tolist(), teacher_logits.tolist(), target.tolist()
    B = len(zs)
    l_ce = sum(ce(zs[i], y[i], cfg.label_smoothing) for i in range(B)) / B
    l_kd = sum(kl(zt[i], zs[i], cfg.kd_temperature) for i in range(B)) / B
    return l_ce, l_kd
