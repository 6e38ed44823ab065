"""The seam between the server's round loop and a launcher that starts clients on demand (waves).

Without a pool (``FederationServer.pool_of_clients is None``: ``mode=server``,
``mode=embedded launcher=local``) every client is a process that connects by
itself and stays; a round samples among the *connected, ready* clients.

A launcher that can hold only some clients alive at once (``launcher=ray``:
:class:`fedplug.launchers.ray.RayClientPool`) gives the server a
:class:`ClientPool` before :meth:`~fedplug.server.FederationServer.run_federation`
starts (``server.pool_of_clients = pool``).  The server then:

1. at start-up (``wait_for_clients``) checks that the pool *registers* at least
   ``run.min_clients`` clients, and waits for ``min(run.min_clients, capacity)``
   of them to be ready (the launcher starts its first wave at once);
2. each round (``_run_round``) samples ``run.clients_per_round`` among
   :meth:`ClientPool.client_ids` with its seeded RNG (the same draw as without a
   pool when every client is connected), and awaits
   :meth:`ClientPool.ensure_ready` for the sample before the resource check:
   only those clients need to be alive for the round's resource check,
   training and (``eval.clients=round``) evaluation;
3. when clients evaluate and a pool is set, picks evaluators among the
   registered ids too (``_evaluators``; the last round: all of them), and
   replaces its wait for their answers by :meth:`ClientPool.visit`, which
   brings the evaluators up a cluster's capacity at a time.  A client that
   joins while the phase still expects its answer is sent ``stop_and_eval``
   by the server itself (the rule for clients that rejoin owing an answer,
   docs/protocol.md), so the protocol is unchanged.

Deadlines and quorums are the server's, unchanged: the ``ready_timeout_s`` of
:meth:`ensure_ready` bounds bringing a round's clients up; the quorum counts
answers of the clients that became ready and were selected.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from fedplug.collect import PhaseCollector


@runtime_checkable
class ClientPool(Protocol):
    """What a wave-scheduling launcher offers the server.  Every method runs on the server's event loop."""

    def client_ids(self) -> list[str]:
        """Every client id this pool can bring up, sorted, less those that failed for good.

        Called by the server at start-up and at each round's selection; cheap.
        """

    @property
    def capacity(self) -> int:
        """How many clients can be alive at once (the cluster's resources over a client's share)."""

    async def ensure_ready(self, client_ids: Sequence[str], timeout: float) -> list[str]:
        """Have every id in ``client_ids`` connected and ready, within ``timeout`` seconds.

        Called by the server once per round, right after it sampled the
        round's clients and before the resource check.  Starts the clients
        that are not alive, stopping idle ones (not in ``client_ids``) when
        the cluster is full, and returns those of ``client_ids`` that are
        ready at the server (in the order given); the others missed the
        deadline or failed to start, and the round goes on without them.
        """

    async def visit(self, client_ids: Sequence[str], collector: PhaseCollector, timeout: float) -> None:
        """Bring ``client_ids`` up at most :attr:`capacity` at a time until each answered ``collector``.

        Called by the server in place of ``collector.wait(timeout)`` for an
        evaluation phase.  A client alive now is counted first; each one
        started gets ``timeout`` seconds from its start to answer, after which
        the pool gives up on it (``collector.give_up``).  Returns when the
        collector is complete.
        """
