"""flowhub layer: flowhub.worker.proc"""
