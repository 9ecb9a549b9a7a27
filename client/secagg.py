"""Client side of SecAgg+ (protocol: :mod:`fedpeft.secagg`; server: :mod:`strategies.secagg`).

Three stage handlers (keys, shares, unmasking) and the masking of the training reply.
A node's secrets for the round (two X25519 keys, the self-mask seed, the sealed shares
it holds) live in its own Flower ``context.state`` between stages, which Flower keeps on
the SuperNode (and per virtual node in simulation); they never leave the node, and are
dropped after the unmasking stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message

from fedpeft import wire
from fedpeft.errors import ConfigError
from fedpeft.secagg import ClientRound, encode, flatten

STATE_KEY = "secagg-state"


def _save(context: Context, state: ClientRound) -> None:
    context.state[STATE_KEY] = ConfigRecord(state.dump())  # type: ignore[arg-type]


def _load(context: Context, rnd: int) -> ClientRound:
    record = context.state.config_records.get(STATE_KEY)
    state = ClientRound.load(dict(record)) if record is not None else None
    if state is None or state.rnd != rnd:
        held = "none" if state is None else f"round {state.rnd}"
        raise ConfigError(f"secure aggregation: this node has no keys for round {rnd} "
                          f"(it holds {held}); it missed the key stage of this round")
    return state


def keys(msg: Message, context: Context) -> Message:
    """Stage 1: fresh key pairs for this round; reply with the public halves."""
    rnd = int(wire.secagg_fields(msg.content)["round"])
    state = ClientRound(int(msg.metadata.dst_node_id), rnd)
    _save(context, state)
    c_pub, s_pub = state.advertise()
    return Message(wire.secagg_content({"c": c_pub, "s": s_pub}), reply_to=msg)


def share(msg: Message, context: Context) -> Message:
    """Stage 2: sealed shares of the self-mask seed and mask key, one per neighbour."""
    fields = wire.secagg_fields(msg.content)
    state = _load(context, int(fields["round"]))
    peers = {int(j): (k[:32], k[32:]) for j, k in zip(fields["peers"], fields["peer_keys"],
                                                       strict=True)}
    sealed = state.share(peers, int(fields["threshold"]))
    _save(context, state)
    return Message(wire.secagg_content({"to": [str(j) for j in sealed],
                                        "sealed": list(sealed.values())}), reply_to=msg)


def mask_update(deltas: Mapping[str, np.ndarray], weight: float, msg: Message,
                context: Context) -> Any:
    """Stage 3: the update (weighted, fixed point) under this round's masks, as arrays."""
    fields = wire.secagg_fields(msg.content)
    state = _load(context, int(fields["round"]))
    inbox = dict(zip(map(int, fields["inbox_from"]), fields["inbox"], strict=True))
    vector = encode(flatten(deltas), weight, int(fields["frac_bits"]),
                    int(fields["max_clients"]))
    masked = state.mask(vector, inbox)
    _save(context, state)
    return wire.masked_arrays(masked)


def unmask(msg: Message, context: Context) -> Message:
    """Stage 4: the shares the server may have (b of survivors, s of the dropped)."""
    fields = wire.secagg_fields(msg.content)
    state = _load(context, int(fields["round"]))
    revealed = state.reveal(map(int, fields["alive"]), map(int, fields["gone"]))
    del context.state[STATE_KEY]  # this round's secrets are no longer needed
    return Message(wire.secagg_content({
        "of": [str(j) for j in revealed], "kind": [k for k, _, _ in revealed.values()],
        "index": [i for _, i, _ in revealed.values()],
        "share": [s for _, _, s in revealed.values()]}), reply_to=msg)
