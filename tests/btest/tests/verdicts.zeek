# Verdicts become stepstone.log lines with both rules' evidence; with the
# default notice_rule (CONFIDENT) only relay_confident raises Relay_Detected,
# once per source (suppression), with the rule and its margin in $sub; a
# noticed source that stops meeting the rule is logged as cleared and raises
# Relay_Cleared. The stand-in analyzer is Files/standin-analyzer.zeek.
#
# @TEST-EXEC: python3 $SCRIPTS/mkpcap.py handshakes.pcap
# @TEST-EXEC: zeek -b -r handshakes.pcap $PACKAGE $FILES/standin-analyzer.zeek
# @TEST-EXEC: zeek-cut ts src relay relay_confident timing_margin timing_threshold timing_ref timing_samples os_mismatches noticed_by change kind evidence hops_margin hops_samples app_margin app_samples < stepstone.log > stepstone.cut
# @TEST-EXEC: btest-diff stepstone.cut
# @TEST-EXEC: zeek-cut ts note msg sub src < notice.log > notice.cut
# @TEST-EXEC: btest-diff notice.cut
