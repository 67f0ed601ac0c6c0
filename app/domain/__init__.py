"""Pure logic with no Kafka and no faust: programs, request resolution, sampling, daily statistics, anomaly
detection, retention rules."""
