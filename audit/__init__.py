"""``fedrec audit``: what a finished (or crashed) run spent and what left its clients.

Reads a run directory written by the federated server and checks it independently of the code
that wrote it:

* :mod:`.accounting` recomputes ε from the privacy ledger with the run's accountant and an
  independent one (Google's PLD), checks the budget, and composes channels for users present
  on several platforms;
* :mod:`.egress` verifies the hash chains of the logs and every logged reply against the wire
  allowlist and the model's parameter shapes;
* :mod:`.evidence` cross-checks the run directory's files (checkpoints, ``results.json``,
  metrics, egress log) against the ledger round by round: a chain re-computed after removing
  a round verifies, the other files still contradict it;
* :mod:`.nodes` reads what the nodes held and did: their privacy policy (``node-policy.toml``
  of a simulation, ``--node-policy`` files, the digests they reported), their own ledgers
  (checked by the rules the node fails closed on), every refusal and ledger reset, and flags
  what weakens the guarantee against the server;
* :mod:`.trust` derives from the policy in force what holds against the server and what
  does not;
* :mod:`.stats` holds the empirical audit statistics (one-run audit, membership-inference
  metrics, the Gaussian canary-cosine estimator), pure functions with their sources;
* :mod:`.verdicts` holds one small check per verdict (logs, results, accounting, budget,
  egress, evidence, node policy, node ledgers, empirical, files), each a pure function;
* :mod:`.report` turns all of it into ``audit.json``, and into ``audit.md`` and ``audit.html``
  through one :class:`~.document.Document` and the two Jinja2 templates in ``templates/``;
* :mod:`.cli` adds the ``fedrec audit RUN_DIR`` command;
* :mod:`.empirical` (``fedrec audit-empirical``) trains canaried runs in the Simulation Engine
  and audits them with the above.

Must not: import ``serving/``, ``deploy/`` or ``cli/``; rely on the code that wrote the run for
any check (only :mod:`.empirical` imports ``server/``, ``client/`` and ``simulations/``, to run
the pipeline); write inside the run directory except the report's output folder.
"""
