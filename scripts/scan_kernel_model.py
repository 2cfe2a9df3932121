#!/usr/bin/env python3
"""A pure-Python model of kernels/selective_scan.cu for one (batch, channel) block, with small
chunks (4 threads x 3 items), checked against finite differences of its own forward pass: it
validates the kernel's algorithm (chunking, block scans in both directions, the carries between
chunks, every gradient) independently of a GPU. It mirrors the CUDA code step by step, so keep the
two in step when either changes. Pure Python (no NumPy), about a second.

    python3 scripts/scan_kernel_model.py
"""
import math, random
random.seed(1)
TH, IT = 4, 3
CH = TH * IT
def then(p, q): return (p[0]*q[0], q[0]*p[1] + q[1])
def excl_scan(xs, reverse=False):
    order = list(range(len(xs)))[::-1] if reverse else list(range(len(xs)))
    out = [None]*len(xs); acc = (1.0, 0.0)
    for i in order:
        out[i] = acc; acc = then(acc, xs[i])
    return out, acc
def sp(x): return x if x > 20 else math.log1p(math.exp(x))
def sig(x): return 1/(1+math.exp(-x))
def fwd(u, de, A, B, C, Dk, bias, h0, L, N):
    carry = list(h0); y = [0.0]*L; cks = []
    chunks = (L + CH - 1)//CH
    for c in range(chunks):
        cks.append(list(carry))
        dt=[[0]*IT for _ in range(TH)]; dtu=[[0]*IT for _ in range(TH)]; yy=[[0]*IT for _ in range(TH)]
        for th in range(TH):
            for k in range(IT):
                t = c*CH + th*IT + k
                if t < L:
                    x = de[t] + bias; dt[th][k] = sp(x); dtu[th][k] = dt[th][k]*u[t]; yy[th][k] = Dk*u[t]
        for n in range(N):
            a=[[0]*IT for _ in range(TH)]; bb=[[0]*IT for _ in range(TH)]; mine=[]
            for th in range(TH):
                m=(1.0,0.0)
                for k in range(IT):
                    t=c*CH+th*IT+k
                    a[th][k]=math.exp(dt[th][k]*A[n]); bb[th][k]= dtu[th][k]*B[n][t] if t<L else 0.0
                    m=then(m,(a[th][k],bb[th][k]))
                mine.append(m)
            before, total = excl_scan(mine)
            for th in range(TH):
                h = before[th][0]*carry[n] + before[th][1]
                for k in range(IT):
                    t=c*CH+th*IT+k
                    h = a[th][k]*h + bb[th][k]
                    if t<L: yy[th][k] += C[n][t]*h
            carry[n] = total[0]*carry[n] + total[1]
        for th in range(TH):
            for k in range(IT):
                t=c*CH+th*IT+k
                if t<L: y[t]=yy[th][k]
    return y, carry, cks
def bwd(u, de, A, B, C, Dk, bias, h0, L, N, cks, dy_all, dlast):
    gcarry = list(dlast); du=[0.0]*L; dde=[0.0]*L; dA=[0.0]*N; dB=[[0.0]*L for _ in range(N)]; dC=[[0.0]*L for _ in range(N)]
    dD=0.0; dbias=0.0; dh0=[0.0]*N
    chunks=(L+CH-1)//CH
    for c in range(chunks-1,-1,-1):
        dt=[[0]*IT for _ in range(TH)]; uv=[[0]*IT for _ in range(TH)]; dy=[[0]*IT for _ in range(TH)]
        ddt=[[0]*IT for _ in range(TH)]; dU=[[0]*IT for _ in range(TH)]
        for th in range(TH):
            for k in range(IT):
                t=c*CH+th*IT+k; inn=t<L
                x = de[t]+bias if inn else 0
                dt[th][k]= sp(x) if inn else 0; uv[th][k]=u[t] if inn else 0; dy[th][k]=dy_all[t] if inn else 0
                dU[th][k]=Dk*dy[th][k]; dD += dy[th][k]*uv[th][k]
        for n in range(N):
            a=[[0]*IT for _ in range(TH)]; bb=[[0]*IT for _ in range(TH)]; hb=[[0]*IT for _ in range(TH)]; h=[[0]*IT for _ in range(TH)]
            chunk_a=[0.0]*(CH+1); mine=[]
            for th in range(TH):
                m=(1.0,0.0)
                for k in range(IT):
                    t=c*CH+th*IT+k
                    a[th][k]=math.exp(dt[th][k]*A[n]); bb[th][k]=dt[th][k]*uv[th][k]*B[n][t] if t<L else 0.0
                    m=then(m,(a[th][k],bb[th][k])); chunk_a[th*IT+k]=a[th][k]
                mine.append(m)
            chunk_a[CH]=1.0
            before,_=excl_scan(mine)
            start=cks[c][n]
            for th in range(TH):
                run=before[th][0]*start+before[th][1]
                for k in range(IT):
                    hb[th][k]=run; run=a[th][k]*run+bb[th][k]; h[th][k]=run
            cdy=[[0]*IT for _ in range(TH)]; back=[]
            for th in range(TH):
                m=(1.0,0.0)
                for k in range(IT-1,-1,-1):
                    t=c*CH+th*IT+k
                    cdy[th][k]=C[n][t]*dy[th][k] if t<L else 0.0
                    m=then(m,(chunk_a[th*IT+k+1],cdy[th][k]))
                back.append(m)
            after,_=excl_scan(back, reverse=True)
            into_prev=None; da_sum=0.0
            for th in range(TH):
                adj=after[th][0]*gcarry[n]+after[th][1]
                for k in range(IT-1,-1,-1):
                    t=c*CH+th*IT+k
                    adj=chunk_a[th*IT+k+1]*adj+cdy[th][k]
                    if t<L:
                        bn=B[n][t]
                        dC[n][t]+=dy[th][k]*h[th][k]; dB[n][t]+=adj*dt[th][k]*uv[th][k]
                        dU[th][k]+=adj*dt[th][k]*bn
                        da=adj*hb[th][k]*a[th][k]
                        ddt[th][k]+=adj*bn*uv[th][k]+da*A[n]; da_sum+=da*dt[th][k]
                    if k==0 and th==0: into_prev=a[0][0]*adj
            dA[n]+=da_sum; gcarry[n]=into_prev
            if c==0: dh0[n]=into_prev
        for th in range(TH):
            for k in range(IT):
                t=c*CH+th*IT+k
                if t>=L: continue
                dd=ddt[th][k]*sig(de[t]+bias); dbias+=dd; du[t]=dU[th][k]; dde[t]=dd
    return du,dde,dA,dB,dC,dD,dbias,dh0
worst_all = 0.0
for L in [1, 5, 12, 13, 30]:
    N=3
    r=lambda lo,hi: random.uniform(lo,hi)
    u=[r(-1,1) for _ in range(L)]; de=[r(-2,1) for _ in range(L)]; A=[r(-2,-0.2) for _ in range(N)]
    B=[[r(-1,1) for _ in range(L)] for _ in range(N)]; C=[[r(-1,1) for _ in range(L)] for _ in range(N)]
    Dk=r(-1,1); bias=r(-1,0); h0=[r(-1,1) for _ in range(N)]
    wy=[r(-1,1) for _ in range(L)]; ws=[r(-1,1) for _ in range(N)]
    def loss(u,de,A,B,C,Dk,bias,h0):
        y,last,_=fwd(u,de,A,B,C,Dk,bias,h0,L,N); return sum(a*b for a,b in zip(y,wy))+sum(a*b for a,b in zip(last,ws))
    y,last,cks=fwd(u,de,A,B,C,Dk,bias,h0,L,N)
    g=bwd(u,de,A,B,C,Dk,bias,h0,L,N,cks,wy,ws)
    eps=1e-6; worst=0
    def fd(setter):
        p=setter(eps); m=setter(-eps); return (p-m)/(2*eps)
    checks=[]
    for t in range(L):
        checks.append((g[0][t], fd(lambda e: loss([x+(e if i==t else 0) for i,x in enumerate(u)],de,A,B,C,Dk,bias,h0))))
        checks.append((g[1][t], fd(lambda e: loss(u,[x+(e if i==t else 0) for i,x in enumerate(de)],A,B,C,Dk,bias,h0))))
    for n in range(N):
        checks.append((g[2][n], fd(lambda e: loss(u,de,[x+(e if i==n else 0) for i,x in enumerate(A)],B,C,Dk,bias,h0))))
        checks.append((g[7][n], fd(lambda e: loss(u,de,A,B,C,Dk,bias,[x+(e if i==n else 0) for i,x in enumerate(h0)]))))
        for t in range(L):
            Bp=lambda e:[[x+(e if (i==n and j==t) else 0) for j,x in enumerate(row)] for i,row in enumerate(B)]
            checks.append((g[3][n][t], fd(lambda e: loss(u,de,A,Bp(e),C,Dk,bias,h0))))
            Cp=lambda e:[[x+(e if (i==n and j==t) else 0) for j,x in enumerate(row)] for i,row in enumerate(C)]
            checks.append((g[4][n][t], fd(lambda e: loss(u,de,A,B,Cp(e),Dk,bias,h0))))
    checks.append((g[5], fd(lambda e: loss(u,de,A,B,C,Dk+e,bias,h0))))
    checks.append((g[6], fd(lambda e: loss(u,de,A,B,C,Dk,bias+e,h0))))
    worst=max(abs(a-b) for a,b in checks)
    print(f"L={L}: {len(checks)} gradients, max |kernel - finite difference| = {worst:.2e}")
    worst_all = max(worst_all, worst)
if worst_all > 1e-6:
    raise SystemExit(f"the kernel model's gradients disagree with finite differences ({worst_all:.1e})")
