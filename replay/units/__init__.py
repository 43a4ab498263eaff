"""The replay engine's units, one module each: attention, routed branches, per-token units (shared
expert, whole MoE), whole-model skip, token selection and the routed-expert dispatch."""
