"""Every file format, in and out: model sources, the sidecar, the decoded and compact exports."""
