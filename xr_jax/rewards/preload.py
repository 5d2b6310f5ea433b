"""Imported by the reward pool's fork server: pays math-verify's start-up (imports, parser tables) once, so
every worker forked from the server starts warm, in milliseconds."""

from xr_jax.rewards.math_equiv import warm_up

warm_up()
