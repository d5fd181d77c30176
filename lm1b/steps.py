"""The jitted train and eval steps (pure functions of the state and one global batch).

A batch is a dict of global arrays sharded by `partitioning.batch_sharding`:
inputs/targets/positions/segment_ids int32 [B, L], weights float32 [B, L] (1 on real targets),
and for evaluation words float32 [B, L] (on a sentence's first target: its word count + 1).
Metrics come back as replicated float32 scalars, summed over the batch.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lm1b import model as model_lib
from lm1b import loss as loss_lib
from lm1b import partitioning
from lm1b.experiment import StateSpec, TrainState


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves))


def make_train_step(spec: StateSpec, *, label_smoothing: float) -> partitioning.MeshJit:
  """(state, batch) -> (state, metrics); the state is donated.

  metrics: loss_sum, weight_sum (real target tokens), nll_sum, grad_norm, learning_rate,
  finite (1.0 when the loss and the new parameters are all finite).
  """
  model, optimizer = spec.model, spec.optimizer

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"], deterministic=False,
                           rngs={"dropout": dropout_rng})
      loss_sum, weight_sum, nll_sum = loss_lib.cross_entropy_loss(
          logits, batch["targets"], batch["weights"], label_smoothing)
      return loss_sum / jnp.maximum(weight_sum, 1.0), (loss_sum, weight_sum, nll_sum)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (loss_sum, weight_sum, nll_sum)), grads = grad_fn(state.params)
    updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss_sum": loss_sum, "weight_sum": weight_sum, "nll_sum": nll_sum,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": optimizer.schedule(state.step // optimizer.grad_accum_steps),
        "finite": (jnp.isfinite(loss_sum) & _all_finite(params)).astype(jnp.float32),
    }
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

  return partitioning.MeshJit(
      train_step, spec.mesh,
      in_shardings=(spec.shardings, partitioning.batch_sharding(spec.mesh)),
      out_shardings=(spec.shardings, partitioning.replicated(spec.mesh)), donate_argnums=(0,))


def make_eval_step(model_config: model_lib.ModelConfig, mesh: jax.sharding.Mesh,
                   param_shardings: Any) -> partitioning.MeshJit:
  """(params, batch) -> sums over the batch: nll, tokens (weights), words, sentences."""
  model = model_lib.DecoderLM(model_config)

  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"], deterministic=True)
    _, tokens, nll = loss_lib.cross_entropy_loss(logits, batch["targets"], batch["weights"])
    return {"nll": nll, "tokens": tokens, "words": jnp.sum(batch["words"]),
            "sentences": jnp.sum((batch["words"] > 0).astype(jnp.float32))}

  return partitioning.MeshJit(
      eval_step, mesh, in_shardings=(param_shardings, partitioning.batch_sharding(mesh)),
      out_shardings=partitioning.replicated(mesh))
