# A stand-in for the analyzer in the verdict btests: each timed handshake of
# the trace (Scripts/mkpcap.py) becomes one scripted verdict, as the analyzer
# would send it, covering each case the notice logic must tell apart:
#   203.0.113.10  direct host on a long fixed path: the paper's relay holds by
#                 0.3 ms, the confident rule does not.
#   203.0.113.20  two handshakes: a confident timing relay, then a verdict that
#                 no longer holds (a cleared source).
#   203.0.113.12  OS mismatch and one hop further (the paper's rule by the OS,
#                 the confident one as kind forwarding by hops), sent twice: one
#                 notice (suppression); then cleared, then flagged again: a new
#                 flagging is noticed again, despite the suppression interval.
#   2001:db8::10  from an analyzer that sends no confident fields.
#   203.0.113.15  direct, neither rule.
#   203.0.113.17  confident timing relay with no ping (SYN probe reference): the
#                 paper's rule misses it.
#   203.0.113.14  a terminating proxy (kind terminating): its answers to our
#                 banners come 40.3 ms late (cond_app), nothing else holds; the
#                 paper's rule misses it.
# Fixed in the trace: times, addresses; the evidence below is invented. Each
# verdict with confident fields says its kind and evidence (issue 10) as the
# analyzer does: forwarding when confident, else none (terminating for the
# proxy).

redef StepStone::darknet_subnets = {
	198.18.0.0/15,
	[2001:db8:ffff::]/48
};
redef StepStone::websocket_port = 0/tcp;
redef StepStone::reply_wait = 2sec;
# Every handshake published at its reply, in the order the cases above
# assume: app.zeek would hold those to ports 22 and 23 for app_wait
# (tests/app-timing.zeek is about that).
redef StepStone::server_first_ports = set();

global seen: table[addr] of count &default=0;

function scripted(h: StepStone::HandshakeInfo, paper_timing: bool, os: bool,
    confident: bool, margin: interval, ref: string, n: count)
    : StepStone::Verdict
	{
	local v = StepStone::Verdict($src=h$orig_h, $cond_os=os,
	    $cond_timing=paper_timing, $relay=os || paper_timing, $tp_mean=h$tp,
	    $ta_max_mean=h$tp - margin, $samples=n, $t=h$ts, $dst=h$resp_h,
	    $tp=h$tp, $ping_min=5msec, $ping_avg=8msec, $ping_max=h$tp - margin,
	    $fp="unix:Linux:3.11 and newer",
	    $fa=os ? "win:Windows:7 or 8" : "unix:Linux:3.11 and newer",
	    $reasons="scripted", $relay_confident=confident,
	    $cond_timing_strong=margin > 5msec, $timing_margin=margin,
	    $timing_threshold=5msec, $timing_ref=ref, $timing_samples=n,
	    $os_mismatches=os ? 1 : 0);
	v$kind = confident ? "forwarding" : "none";
	v$evidence = vector();
	if ( margin > 5msec )
		v$evidence += fmt("timing=+%.1fms/%d", interval_to_double(margin) * 1000.0, n);
	v$cond_hops = os;
	v$hops_samples = n;
	if ( os )
		{
		v$hops_margin = 1.0;
		v$evidence += fmt("hops=+1/%d", n);
		v$evidence += fmt("os=+1/%d", n);
		}
	return v;
	}

function send(h: StepStone::HandshakeInfo, paper_timing: bool, os: bool,
    confident: bool, margin: interval, ref: string, n: count)
	{
	event StepStone::verdict(scripted(h, paper_timing, os, confident, margin, ref,
	    n));
	}

event StepStone::handshake(h: StepStone::HandshakeInfo)
	{
	if ( ! h?$tp )
		return;

	local src = h$orig_h;
	++seen[src];

	if ( src == 203.0.113.10 )
		send(h, T, F, F, 300usec, "ping", 1);
	else if ( src == 203.0.113.20 && seen[src] == 1 )
		send(h, T, F, T, 100msec, "ping", 1);
	else if ( src == 203.0.113.20 )
		send(h, F, F, F, 1msec, "ping", 2);
	else if ( src == 203.0.113.12 )
		{
		send(h, F, T, T, 0usec, "ping", 1);
		send(h, F, T, T, 0usec, "ping", 1);
		send(h, F, F, F, 0usec, "ping", 2);
		send(h, F, T, T, 0usec, "ping", 3);
		}
	else if ( src == [2001:db8::10] )
		event StepStone::verdict(StepStone::Verdict($src=src, $cond_os=F,
		    $cond_timing=T, $relay=T, $tp_mean=h$tp, $ta_max_mean=1msec,
		    $samples=1, $reasons="an older analyzer"));
	else if ( src == 203.0.113.15 )
		send(h, F, F, F, 200usec, "ping", 1);
	else if ( src == 203.0.113.17 )
		send(h, F, F, T, 30msec, "syn", 1);
	else if ( src == 203.0.113.14 )
		{
		local v = scripted(h, F, F, T, 200usec, "ping", 3);
		v$kind = "terminating";
		v$evidence = vector("app=+40.3ms/3");
		v$cond_app = T;
		v$app_margin = 40300.0;
		v$app_samples = 3;
		event StepStone::verdict(v);
		}
	}
