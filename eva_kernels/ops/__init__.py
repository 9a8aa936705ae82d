"""The eva_kernels ops, one module each: schema, fake, argument checks and backend dispatch.

* :mod:`.cov_update` — ``eva_kernels::cov_update``, the fused masked, shifted covariance update.
* :mod:`.topk_eigh` — the randomized, warm-startable truncated eigensolver.
* :mod:`.topk_eigh_batched` — the same over many matrices of one size, in batched calls.
"""
