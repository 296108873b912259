# Verdicts become stepstone.log lines and, for relays, Relay_Detected notices
# suppressed per source. A stand-in for the analyzer (below) turns each timed
# handshake into a verdict: a fixed 50 ms maximum ping, timing relay when
# the mean T^p exceeds it, and an OS mismatch for the RST scanner.
# The baselines were written by reasoning from the trace, not by running Zeek
# (none was available where they were written); check them on a real Zeek.
#
# @TEST-EXEC: python3 $SCRIPTS/mkpcap.py handshakes.pcap
# @TEST-EXEC: zeek -b -r handshakes.pcap $PACKAGE %INPUT
# @TEST-EXEC: btest-diff stepstone.log
# @TEST-EXEC: zeek-cut ts note msg sub src < notice.log > notice.cut
# @TEST-EXEC: btest-diff notice.cut

# Set, not added to: zkg runs this suite after its build step wrote the
# operator's settings into site.zeek, which the package loads. A listener
# would also keep Zeek running after the trace.
redef StepStone::darknet_subnets = {
	198.18.0.0/15,
	[2001:db8:ffff::]/48
};
redef StepStone::websocket_port = 0/tcp;
redef StepStone::reply_wait = 2sec;

global samples: table[addr] of count &default=0;
global tp_sum: table[addr] of double &default=0.0;

event StepStone::handshake(h: StepStone::HandshakeInfo)
	{
	if ( ! h?$tp )
		return;

	local src = h$orig_h;
	samples[src] = samples[src] + 1;
	tp_sum[src] = tp_sum[src] + interval_to_double(h$tp);
	local mean = double_to_interval(tp_sum[src] / samples[src]);
	local ping_max = 50msec;
	local cond_timing = mean > ping_max;
	local cond_os = h$reply == "rst";
	local fp = cond_os ? "unix:Linux:2.2.x-3.x" : "unix:Linux:3.11 and newer";
	local fa = cond_os ? "win:Windows:7 or 8" : "unix:Linux:3.11 and newer";
	local reasons = cond_timing ? "timing" : ( cond_os ? "os" : "none" );

	event StepStone::verdict(StepStone::Verdict($src=src, $cond_os=cond_os,
	    $cond_timing=cond_timing, $relay=cond_os || cond_timing,
	    $tp_mean=mean, $ta_max_mean=ping_max, $samples=samples[src],
	    $t=h$ts, $dst=h$resp_h, $tp=h$tp, $ping_min=5msec, $ping_avg=8msec,
	    $ping_max=ping_max, $fp=fp, $fa=fa, $reasons=reasons));
	}
