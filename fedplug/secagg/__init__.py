"""Secure aggregation (SecAgg+, Bell et al. 2020; Bonawitz et al. 2017): the server learns only the sum.

The crypto core, pure and unit-tested, with no networking:

* :mod:`fedplug.secagg.keys` -- X25519 key agreement + HKDF-SHA256, and the
  ChaCha20-Poly1305 envelope the Shamir shares travel in;
* :mod:`fedplug.secagg.shamir` -- t-of-n Shamir secret sharing over GF(2^521 - 1);
* :mod:`fedplug.secagg.masking` -- fixed-point quantisation into Z_{2^64} and the
  ChaCha20 pseudo-random masks;
* :mod:`fedplug.secagg.protocol` -- the client and server state machines of
  the four message rounds (advertise keys, share keys, masked input, unmask),
  with dropout recovery; FedAvg weighting by client pre-scaling.

Not yet wired into a federation run: ``docs/privacy.md`` says what is missing.
"""
