"""What parabench's ReFrame site configurations share: the logging, with a performance log that has one
line per performance variable (check, system:partition, variable, value, unit, reference and bounds)."""

LOGGING = [{
    "level": "debug",
    "handlers": [
        {"type": "stream", "name": "stdout", "level": "info", "format": "%(message)s"},
        {"type": "file", "name": "reframe.log", "level": "debug",
         "format": "[%(asctime)s] %(levelname)s: %(check_info)s: %(message)s", "append": False},
    ],
    "handlers_perflog": [{
        # perflogs/<system>/<partition>/<check>.log under the prefix
        "type": "filelog",
        "prefix": "%(check_system)s/%(check_partition)s",
        "level": "info",
        "format": "%(check_job_completion_time)s|%(check_info)s|%(check_result)s|%(check_perfvalues)s",
        "format_perfvars": "%(check_perf_var)s=%(check_perf_value)s %(check_perf_unit)s"
                           " (ref %(check_perf_ref)s, %(check_perf_lower_thres)s..%(check_perf_upper_thres)s)|",
        "append": True,
    }],
}]

