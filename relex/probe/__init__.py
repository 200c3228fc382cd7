"""Verifying predictions in function space: a small probe of training problems (:mod:`relex.probe.problems`),
scored on a checkpoint (:mod:`relex.probe.scoring`), the paired sequential search over candidate targets
(:mod:`relex.probe.search`), and the pass that writes and probes the candidates of a run
(:mod:`relex.probe.verify`)."""
