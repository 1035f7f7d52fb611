"""edgeloop's own chaos suite (issue 13): faults injected into real processes, checked against
an independent history.

Every scenario runs a real Tansu broker, a real Mosquitto, the factory simulator, the cloud
service (``edgeloop cloud run``) and one edge agent (``edgeloop edge run``) as child processes,
puts them under load, injects its fault (SIGKILL, SIGSTOP, a broker that comes back empty, a
wiped state directory, poison input, an overflowing outbox), lets the system settle, and then
checks the whole history:

* :mod:`tests.chaos.rig` starts, kills and stops the processes (nothing outlives a scenario);
* :mod:`tests.chaos.load` is the MQTT QoS 1 numbered publisher (the source of truth for the
  readings) and the poison publishers; :mod:`tests.chaos.device` a poisoned OPC UA + Modbus
  device process;
* :mod:`tests.chaos.ledger` reads every uplink topic with its own consumer and records every
  ``(agent_id, incarnation, batch_seq)`` seen on the wire;
* :mod:`tests.chaos.checker` holds what the agents numbered (their outbox files), what the
  overflow policy dropped, what the cloud durably applied (its ``applied_batches`` audit rows)
  and what the ledger saw against each other: lost, duplicated on the wire, applied twice;
* :mod:`tests.chaos.scenarios` names the faults; ``python -m tests.chaos`` runs them and prints
  one row per scenario (docs/reliability.md, "The chaos suite").
"""
