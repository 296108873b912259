# notice_rule decides which verdicts raise Relay_Detected: PAPER notices the
# direct host the paper's rule flags by 0.3 ms and misses the relay seen only
# through the SYN probe; EITHER notices both. Set as a command-line redef, as
# an operator would in local.zeek. The stand-in: Files/standin-analyzer.zeek.
#
# @TEST-EXEC: python3 $SCRIPTS/mkpcap.py handshakes.pcap
# @TEST-EXEC: zeek -b -r handshakes.pcap $PACKAGE $FILES/standin-analyzer.zeek StepStone::notice_rule=StepStone::PAPER
# @TEST-EXEC: zeek-cut src note sub < notice.log > paper.cut
# @TEST-EXEC: zeek-cut src noticed_by change < stepstone.log >> paper.cut
# @TEST-EXEC: btest-diff paper.cut
# @TEST-EXEC: rm -f notice.log stepstone.log
# @TEST-EXEC: zeek -b -r handshakes.pcap $PACKAGE $FILES/standin-analyzer.zeek StepStone::notice_rule=StepStone::EITHER
# @TEST-EXEC: zeek-cut src note sub < notice.log > either.cut
# @TEST-EXEC: zeek-cut src noticed_by change < stepstone.log >> either.cut
# @TEST-EXEC: btest-diff either.cut
