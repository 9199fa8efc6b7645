"""The pure domain: enums, the job transition table, domain errors. No I/O."""
