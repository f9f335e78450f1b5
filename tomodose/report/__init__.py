"""Human- and machine-readable reports (:mod:`~tomodose.report.protocol_report`)."""
